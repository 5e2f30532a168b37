"""``DDPProbeHook``: what the ``ddp`` part of the GPU check reads back from a ``torchrun`` training run.

Imported by the run's config (``custom_imports``); writes ``out_file`` (JSON) after every training
iteration: the process group's backend and size, the model wrapper's class and its
``find_unused_parameters``, the device of the parameters, the iterations done and the last loss.
"""
from __future__ import annotations

import json
import os

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DDPProbeHook(Hook):
    priority = 'LOWEST'

    def __init__(self, out_file: str) -> None:
        self.out_file = out_file

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        import torch.distributed as dist
        model = runner.model
        module = getattr(model, 'module', model)
        loss = None
        if isinstance(outputs, dict) and 'loss' in outputs:
            loss = float(outputs['loss'].detach())
        data = dict(backend=dist.get_backend() if dist.is_initialized() else None,
                    world_size=dist.get_world_size() if dist.is_initialized() else 1,
                    wrapper=type(model).__name__,
                    find_unused_parameters=getattr(model, 'find_unused_parameters', None),
                    param_device=str(next(module.parameters()).device), iters=runner.iter + 1, last_loss=loss)
        if runner.rank == 0:
            tmp = self.out_file + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(data, f)
            os.replace(tmp, self.out_file)
