"""Numerical checks of the claims the trainer rests on (simulations, closed-form predictions).

Pure and CPU-sized; nothing here is imported by the training path.
"""
