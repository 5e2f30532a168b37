"""A hook for the distributed tests: each process saves its model state, rank and world size before and after
training (``before_rank<R>.pth`` / ``after_rank<R>.pth`` in its work dir, with the parameter names), so that a
test can compare the replicas. Imported in the worker processes through the config's ``custom_imports``."""
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankStateHook(Hook):
    priority = 'LOWEST'

    def _dump(self, runner, tag: str) -> None:
        model = getattr(runner.model, 'module', runner.model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state['__dist__'] = dict(rank=runner.rank, world_size=runner.world_size, wrapper=type(runner.model).__name__)
        state['__params__'] = [name for name, _ in model.named_parameters()]
        torch.save(state, osp.join(runner.work_dir, f'{tag}_rank{runner.rank}.pth'))

    def before_train(self, runner) -> None:
        self._dump(runner, 'before')

    def after_train(self, runner) -> None:
        self._dump(runner, 'after')
