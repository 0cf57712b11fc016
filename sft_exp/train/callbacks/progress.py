"""The Trainer's progress bars, labelled with what they measure (`train`, `eval arith`, ...)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length


class LabelledProgress(ProgressCallback):
    """transformers' ProgressCallback whose bars carry a label from their first line; the trainer sets `label`
    before each evaluation. Only the bars' creation is ours (tqdm takes the label there); updates are the parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.label = "eval"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc="train", dynamic_ncols=True)
        self.current_step = 0

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kw: Any) -> None:
        if self.prediction_bar is None and state.is_world_process_zero and has_length(eval_dataloader):
            leave = self.training_bar is None
            self.prediction_bar = tqdm(total=len(eval_dataloader), desc=self.label, leave=leave, dynamic_ncols=True)
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kw)
