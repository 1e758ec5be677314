"""What an installed block forward must do so HF's gradient checkpointing keeps working: HF 5.x
wraps the CLASS's forward (GradientCheckpointingLayer.__init_subclass__ -> forward_with_checkpointing),
and an instance-level forward (ldbfx.install) bypasses it. Re-apply the same rule around the routed forward."""
import functools, torch

class _CkptAware:
    def __init__(self, block, routed):
        self.block, self.routed = block, routed
        self.__signature__ = getattr(routed, "__signature__", None)
    def __call__(self, *args, **kwargs):
        b = self.block
        if getattr(b, "gradient_checkpointing", False) and b.training and torch.is_grad_enabled():
            kwargs = {**kwargs, "use_cache": False} if kwargs.get("use_cache") else kwargs
            if kwargs.get("cache") is not None and not b._can_checkpoint_with_cache:
                kwargs = {**kwargs, "cache": None}
            return b._gradient_checkpointing_func(functools.partial(self.routed, **kwargs), *args)
        return self.routed(*args, **kwargs)

def hf_checkpointing_aware(block):
    block.__dict__["forward"] = _CkptAware(block, block.__dict__["forward"])
