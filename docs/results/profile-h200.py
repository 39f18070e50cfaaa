# Historical record: the exact script run on the H200 at commit 1cda363. scripts/profile_step.py is the maintained form.
"""Where our step's time goes on this device: SmolLM2-shaped model, P=4, G=16, 40 tokens."""
import cProfile, io, pstats, statistics, sys, time
from pathlib import Path
import torch

from vlm_treegrpo.bench import BenchSpec, bench_task, sync
from vlm_treegrpo.bench_ours import ours_config
from vlm_treegrpo.optim import adamw, warmup_constant
from vlm_treegrpo.policy import make_policy
from vlm_treegrpo.rewards import RewardSet
from vlm_treegrpo.rollout import sampling as S
from vlm_treegrpo.rollout.logprobs import TokenLogp
from vlm_treegrpo.runtime import autocast_ctx
from vlm_treegrpo.step import rollout_step, update_step

src, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
T0 = time.time()
if Path(src).is_dir() and not (Path(src) / "model.safetensors").exists():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    m.save_pretrained(src)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
spec0 = dict(workload="text", model="x", model_dir=src, G=16, max_new_tokens=40, thought_tokens=16, prompts_per_step=4,
             micro_batch=4, steps=40, warmup=0, lr=1e-12, reward="vlm_treegrpo.bench:length_signal_reward")
cfg = ours_config(BenchSpec(K=16, M=1, **spec0))
policy = make_policy(src, dev, cfg.model.dtype, cfg.model.attn_implementation)
examples, instruction = bench_task(BenchSpec(K=16, M=1, **spec0))
prompts = [policy.encode(ex, instruction) for ex in examples]
rs = RewardSet.from_config(cfg.algo.rewards)
params = [p for p in policy.model.parameters() if p.requires_grad]
opt = adamw(params, 1e-12, cfg.optim.betas, 0.0)
sch = warmup_constant(opt, 0)
print(f"setup {time.time() - T0:.1f}s attn={policy.model.config._attn_implementation} threads={torch.get_num_threads()}", flush=True)
it = [0]

def batch():
    i = it[0] % 10; it[0] += 1
    return examples[i * 4:(i + 1) * 4], prompts[i * 4:(i + 1) * 4]

def roll(c):
    ex, pr = batch(); t = time.perf_counter(); d = rollout_step(policy, ex, pr, rs, c); sync(dev); return d, time.perf_counter() - t

def upd(c, d):
    t = time.perf_counter(); update_step(policy, None, opt, sch, d, c, dev); sync(dev); return time.perf_counter() - t

def med(xs): return f"{statistics.median(xs):.3f} ({' '.join(f'{x:.2f}' for x in xs)})"

def logp_fb(c, b, reps=3):
    out = []
    for _ in range(reps):
        opt.zero_grad(set_to_none=True); t = time.perf_counter()
        with autocast_ctx(dev, c.model.autocast):
            lp = policy.logp(b, c.rollout.temperature)
        (lp * b.target_mask).sum().backward(); sync(dev); out.append(time.perf_counter() - t)
    return out

orig_icdf = S.inverse_cdf_sample
def icdf_nosync(logits, generator=None):
    w = (logits.double() - logits.double().amax(-1, keepdim=True)).exp_(); cdf = w.cumsum_(-1)
    u = torch.rand(cdf[:, -1:].shape, dtype=torch.float64, device=logits.device, generator=generator) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return torch.where(idx >= logits.shape[-1], logits.argmax(-1), idx)

for K, M in ((16, 1), (4, 4)):
    c = ours_config(BenchSpec(K=K, M=M, **spec0))
    d, _ = roll(c); upd(c, d)  # warm-up
    r, u = [], []
    for _ in range(n):
        d, t = roll(c); r.append(t); u.append(upd(c, d))
    print(f"== {K}x{M} rollout {med(r)} update {med(u)}", flush=True)
    pr = cProfile.Profile(); pr.enable(); d, t = roll(c); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    print(f"-- cProfile rollout ({t:.2f}s)\n" + "\n".join(l for l in s.getvalue().splitlines()[6:] if l.strip()), flush=True)
    S.inverse_cdf_sample = icdf_nosync
    r2 = [roll(c)[1] for _ in range(n)]
    S.inverse_cdf_sample = orig_icdf
    print(f"rollout, sampler without sync: {med(r2)}", flush=True)
    th = torch.get_num_threads(); torch.set_num_threads(4)
    r3 = [roll(c)[1] for _ in range(n)]; d4, _ = roll(c); u3 = [upd(c, d4) for _ in range(n)]
    torch.set_num_threads(th)
    print(f"4 threads: rollout {med(r3)} update {med(u3)}", flush=True)
    b = d.packed.to(dev)
    print(f"logp fwd+bwd: plan {med(logp_fb(c, b))} dense-mask {med(logp_fb(c, b.dense()))}", flush=True)
    TokenLogp.CHUNK = 1024
    print(f"logp fwd+bwd plan, CHUNK 1024: {med(logp_fb(c, b))}", flush=True)
    TokenLogp.CHUNK = 64
    print(f"   (t={time.time() - T0:.0f}s)", flush=True)
