"""TRL's ``GRPOTrainer`` on a :class:`~vlm_treegrpo.bench.spec.BenchSpec`: the other side of the benchmark.

TRL reads its settings from the spec's training config (:func:`trl_args`), chosen to do the same
work as ours (every one is reported in the result):

* one generation batch of ``P * G`` completions per optimizer step: ``per_device_train_batch_size
  = micro_batch * G`` rows, ``gradient_accumulation_steps = steps_per_generation = P / micro_batch``,
  ``num_iterations = 1``, so TRL skips its old-log-prob pass exactly as our on-policy update does;
* ``beta = 0`` (no reference model), ``loss_type = "dapo"`` (token mean over the whole batch, our
  ``token_mean``), ``scale_rewards = "group"`` (our std scaling), ``epsilon = 0.2``;
* ``gradient_checkpointing = False`` (TRL's default is True; ours does not by default: ``model.gradient_checkpointing``),
  ``bf16 = (autocast == "bfloat16")`` with ``use_cpu`` on a CPU-only machine;
* torch's CPU threads by our rule (``set_threads``: all cores on the CPU, 4 beside a GPU);
* constant learning rate, AdamW betas (0.9, 0.99), no weight decay, grad-norm clip 1.0;
* no logging, saving, evaluation or progress bar; the dataset is not shuffled, so step s sees
  the same prompts as ours.

Timing: a :class:`~transformers.TrainerCallback` times ``on_step_begin`` -> ``on_step_end``; the
rollout share is TRL's ``_generate_and_score_completions`` timed by wrapping it on the instance.
The reward is ours (correctness by default), wrapped as a TRL reward function; it also counts
the real completion tokens (TRL's ``completion_ids`` are cut after the first EOS, no padding).
"""
from __future__ import annotations

import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from vlm_treegrpo.bench.probes import StepProbe, measure, sync
from vlm_treegrpo.bench.spec import BenchSpec, bench_task
from vlm_treegrpo.config import resolve_autocast
from vlm_treegrpo.data.sources import task_from_config
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.models.loader import pick_attn_implementation, pick_dtype, save_weights
from vlm_treegrpo.policy.factory import lora_config
from vlm_treegrpo.rewards.functions import RewardSet, resolve_reward
from vlm_treegrpo.rollout.prompts import prompt_ids, user_message
from vlm_treegrpo.train.runtime import resolve_device, set_threads


def reward_for_trl(name: str, calls: list[dict], G: int):
    """Our reward ``name`` (:func:`~vlm_treegrpo.rewards.functions.resolve_reward`; correctness by default)
    in TRL's reward signature. Each call (one per generation batch) appends its completion tokens,
    mean reward and the fraction of prompts whose G rewards are all equal to ``calls`` (TRL
    orders a prompt's G completions consecutively)."""
    fn = resolve_reward(name)

    def reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
        texts = [_text_of(c) for c in completions]
        rewards = [float(fn(t, Example(prompt="", answer=a))) for t, a in zip(texts, answer)]
        groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
        calls.append({"completion_tokens": sum(len(ids) for ids in completion_ids), "reward": sum(rewards) / len(rewards),
                      "zero_std_frac": sum(len(set(g)) == 1 for g in groups) / len(groups)})
        return rewards

    reward.__name__ = name.rsplit(":", 1)[-1]  # TRL names its reward metrics after the function
    return reward


def _text_of(completion) -> str:
    """A TRL completion (a string, or conversational ``[{"role", "content"}]``) as text."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def trl_dataset(spec: BenchSpec):
    """The bench prompts as a TRL conversational dataset (plus ``images`` for the VLM workload)."""
    examples, instruction = bench_task(spec)
    rows = [{"prompt": [{"role": "user", "content": user_message(ex, instruction)}], "answer": ex.answer} for ex in examples]
    if spec.workload == "vlm":
        for row, ex in zip(rows, examples):
            row["images"] = list(ex.images)
    return Dataset.from_list(rows), examples, instruction


def grpo_args(spec: BenchSpec, output_dir: str):
    """The :class:`trl.GRPOConfig` for the spec: TRL doing the work of its training config, prompts
    in the bench's order."""
    return trl_args(spec.train, output_dir, spec.warmup + spec.steps, spec.micro_prompts, shuffle=False)


def run_trl(spec: BenchSpec) -> dict:
    """Train TRL for ``warmup + steps`` steps on the spec and measure them."""
    from trl import GRPOTrainer

    set_threads(spec.train.model.threads, resolve_device(spec.train.model.device))  # the rule ours follows, so threads are no difference
    dataset, examples, instruction = trl_dataset(spec)
    calls: list[dict] = []
    rollout_seconds: list[float] = []
    autocast_seen: dict[str, bool] = {}

    probe = StepProbe(resolve_device(spec.train.model.device), spec.sample_stacks_ms)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds, self.probed = 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            probe.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(args.device)
            self.seconds.append(time.perf_counter() - self.t0)
            self.probed.append(probe.stop())

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        trainer = GRPOTrainer(model=spec.model_dir, reward_funcs=[reward_for_trl(spec.train.algo.rewards[0], calls, spec.G)], args=grpo_args(spec, out),
                              train_dataset=dataset, callbacks=[timer])
        generate_and_score = trainer._generate_and_score_completions

        def timed(*a, **kw):
            t0 = time.perf_counter()
            result = generate_and_score(*a, **kw)
            rollout_seconds.append(time.perf_counter() - t0)
            return result

        trainer._generate_and_score_completions = timed

        def record_autocast(module, inputs):  # is autocast on in generation (no grad) and in training?
            autocast_seen["train" if torch.is_grad_enabled() else "generate"] = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")

        hook = trainer.model.get_input_embeddings().register_forward_pre_hook(record_autocast)
        with probe:
            trainer.train()
        hook.remove()
        prompt_check = _prompts_match(trainer, examples, instruction, spec)
        args = trainer.args
    P, G = spec.prompts_per_step, spec.G
    rows = [{"seconds": s, "rollout_seconds": r, "completions": P * G, "generated_tokens": c["completion_tokens"], **c, **p}
            for s, r, c, p in zip(timer.seconds, rollout_seconds, calls, timer.probed)]
    if not len(timer.seconds) == len(rollout_seconds) == len(calls) == spec.warmup + spec.steps:
        raise RuntimeError(f"TRL ran {len(timer.seconds)} steps, {len(rollout_seconds)} rollouts, {len(calls)} reward calls; "
                           f"expected {spec.warmup + spec.steps} of each")
    import trl

    settings = {
        "trainer": f"trl {trl.__version__} GRPOTrainer", "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "steps_per_generation": args.steps_per_generation,
        "generation_batch_size": args.generation_batch_size, "num_iterations": args.num_iterations, "beta": args.beta,
        "loss_type": args.loss_type, "scale_rewards": args.scale_rewards, "epsilon": args.epsilon,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "bf16": args.bf16, "use_cpu": args.use_cpu,
        "gradient_checkpointing": args.gradient_checkpointing, "model_init_kwargs": args.model_init_kwargs,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(args.lr_scheduler_type), "optim": str(args.optim),
        "adam_betas": [args.adam_beta1, args.adam_beta2], "max_grad_norm": args.max_grad_norm,
        "autocast_active": autocast_seen, "torch_threads": torch.get_num_threads(),
        "prompt_ids_match_ours": prompt_check,
    }
    return {"settings": settings, **measure(rows, spec.warmup)}


def _prompts_match(trainer, examples, instruction, spec: BenchSpec) -> bool | None:
    """Whether TRL's prompt token ids equal ours for the first step's prompts (text workload only)."""
    if spec.workload != "text" or not hasattr(trainer, "_tokenize_prompts"):
        return None
    batch = examples[: spec.prompts_per_step]
    theirs, _, _ = trainer._tokenize_prompts([[{"role": "user", "content": user_message(ex, instruction)}] for ex in batch])
    ours = [prompt_ids(trainer.processing_class, ex, instruction) for ex in batch]
    return [list(t) for t in theirs] == ours


def trl_args(cfg, output_dir: str, max_steps: int, micro_prompts: int, shuffle: bool = True):
    """TRL's :class:`trl.GRPOConfig` doing the work of our config ``cfg`` (a
    :class:`~vlm_treegrpo.config.TrainConfig`) with flat groups of ``G = K*M``: one generation
    batch of ``prompts_per_step * G`` completions per optimizer step, ``micro_prompts`` prompts
    per forward (gradient accumulation and ``steps_per_generation`` = the number of
    micro-batches, ``num_iterations = 1``, so TRL skips its old-log-prob pass as our on-policy
    update does); the same token budget, temperature / top-p / top-k, learning rate, warm-up,
    AdamW betas, weight decay, clipping, KL weight and seed; the weights in our training dtype, the
    attention kernel ours would pick (flash-attention on a GPU with flash-attn and half-precision
    weights, else sdpa); loss ``dapo`` (a token mean over the
    batch, our ``token_mean``) with group std scaling, ``epsilon = 0.2``; gradient checkpointing
    off (as ours by default), bf16 as our autocast; no logging, saving or evaluation."""
    from trl import GRPOConfig

    r, o = cfg.rollout, cfg.optim
    G = r.K * r.M
    device = resolve_device(cfg.model.device).type
    dtype = pick_dtype(device, cfg.model.training_dtype(device))
    weight_dtype = str(dtype).removeprefix("torch.")
    attn = cfg.model.attn_implementation
    attn = pick_attn_implementation(device, dtype) if attn == "auto" else attn
    accum = max(1, r.prompts_per_step // micro_prompts)
    return GRPOConfig(
        output_dir=output_dir, use_cpu=device == "cpu", bf16=resolve_autocast(cfg.model.autocast, device) == "bfloat16", fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": weight_dtype, "attn_implementation": attn},
        per_device_train_batch_size=r.prompts_per_step // accum * G, gradient_accumulation_steps=accum, steps_per_generation=accum,
        num_iterations=1, num_generations=G, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, beta=cfg.algo.beta, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", learning_rate=o.lr, lr_scheduler_type="constant_with_warmup" if o.warmup_steps else "constant",
        warmup_steps=o.warmup_steps, adam_beta1=o.betas[0], adam_beta2=o.betas[1], weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm, max_steps=max_steps, shuffle_dataset=shuffle, seed=o.seed, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, remove_unused_columns=False,
    )


def race_trl(cfg, model_dir: str, out_dir: str, budget_s: float, max_steps: int = 100_000) -> dict:
    """Train TRL from ``model_dir`` on our config's task and rewards until ``budget_s`` seconds of
    training have passed (checked after each step, as our ``optim.time_budget_s``), then save the
    model to ``out_dir``. With ``model.lora_r > 0`` TRL trains the same LoRA adapters as ours
    (its ``peft_config``) and saves the weights with them merged, as ours does. Returns the steps
    run, the seconds, and the mean reward per step."""
    from trl import GRPOTrainer

    set_threads(cfg.model.threads, resolve_device(cfg.model.device))
    task = task_from_config(cfg.data)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": user_message(ex, task.instruction)}], "answer": ex.answer}
                                 for ex in task.train])
    G = cfg.rollout.K * cfg.rollout.M
    rewards = RewardSet.from_config(cfg.algo.rewards, cfg.algo.reward_timeout_s)
    calls: list[dict] = []
    funcs = [reward_for_trl(name, calls if i == 0 else [], G) for i, (name, _, _) in enumerate(rewards.fns)]

    class Budget(TrainerCallback):
        def __init__(self):
            self.t0, self.steps = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if time.perf_counter() - self.t0 >= budget_s:
                control.should_training_stop = True

    budget = Budget()
    with tempfile.TemporaryDirectory(prefix="trl-race-") as tmp:
        args = trl_args(cfg, tmp, max_steps, cfg.optim.micro_batch)
        args.reward_weights = [w for _, _, w in rewards.fns]
        m = cfg.model
        peft = lora_config(m.lora_r, m.lora_alpha, m.lora_targets) if m.lora_r > 0 else None  # (the same adapters as ours)
        trainer = GRPOTrainer(model=model_dir, reward_funcs=funcs, args=args, train_dataset=dataset, callbacks=[budget],
                              peft_config=peft)
        trainer.train()
        seconds = time.perf_counter() - budget.t0
        save_weights(trainer.model, out_dir)  # (with LoRA: merged, as ours saves, for the same evaluator)
        trainer.processing_class.save_pretrained(out_dir)
    return {"steps": budget.steps, "train_seconds": round(seconds, 2),
            f"mean_{rewards.names[0]}_per_step": [round(c["reward"], 4) for c in calls]}
