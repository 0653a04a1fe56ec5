"""The final model of a `train_sft.py` run on the bundled task's held-out test split: questions in no training or
validation split, answered at the stage the run reached."""

import json
from pathlib import Path

from coconut.eval_config import CoconutEvalConfig
from coconut.evaluation import evaluate_stage
from coconut.results import EvalResults, StageResult
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split


def evaluate_held_out_test(trainer, task: SyntheticTaskConfig, synthetic_dir: str | Path) -> StageResult:
    """The trained model of `trainer` on `task`'s test split (rendered into `synthetic_dir`), at its stage reached."""
    args = trainer.args
    test = build_synthetic_split(synthetic_dir, "test", task)
    config = CoconutEvalConfig(
        stage=trainer.stage_reached,
        batch_size=args.per_device_eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        disable_tqdm=True,
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    return evaluate_stage(model, trainer.processing_class, test, args.curriculum, config, label="test")


def write_test_results(output_dir: str | Path, test: StageResult) -> None:
    """`eval_results.json` gains `"test"`; `test/` holds its predictions, table and plot."""
    output_dir = Path(output_dir)
    EvalResults([test]).save(output_dir / "test")
    results_path = output_dir / "eval_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["test"] = {"stage": test.stage, **test.metrics}
    results_path.write_text(json.dumps(results, indent=2) + "\n")


__all__ = ["evaluate_held_out_test", "write_test_results"]
