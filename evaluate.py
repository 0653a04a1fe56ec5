"""Evaluate a Coconut-InternVL model on a reasoning dataset: accuracy, generated tokens and speed at one stage.

```bash
# The model `python train_sft.py` trains, on the test split of its arrow-chase task (2 x 2 board, up to 3 arrows),
# at its last stage
python evaluate.py --model outputs/demo --dataset arrow_chase --synthetic_grid_size 2 --synthetic_max_hops 3 \
    --split test --stage 3 --max_latent_stage 3

# ProsQA test split (Coconut JSON files `prosqa_<split>.json` in a folder), the Coconut prompt of stage 6
python evaluate.py --model outputs/prosqa --dataset data/prosqa --split test --stage 6 --max_latent_stage 6

# A fixed number of continuous thoughts instead of a stage, results written to outputs/eval
python evaluate.py --model outputs/prosqa --dataset data/prosqa/prosqa_valid.json --num_latent_thoughts 6 \\
    --output_dir outputs/eval

# A chain-of-thought baseline, and A-OKVQA from the Hub (direct-answer scores use the 10 annotators' answers)
python evaluate.py --model outputs/cot --dataset data/prosqa --split test --method cot
python evaluate.py --model my/coconut-internvl3-1b --dataset HuggingFaceM4/A-OKVQA --split validation --stage 3

# A YAML file whose keys are the flags' names works too
python evaluate.py --config my_eval.yaml
```

Writes `eval_results.json`, `eval_results.png`, `eval_results.md` and the predictions to `--output_dir` (default:
`<model>/eval` for a local model), and with `--update_model_card` puts the table into the model's README.md.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from coconut.curriculum import CurriculumConfig
from coconut.data import load_split
from coconut.evaluation import (
    CoconutEvalConfig,
    EvalResults,
    evaluate_stage,
    load_model_and_processor,
    write_table_into_card,
)
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "Local folder or Hub id of a Coconut-InternVL model."})
    dataset: str = field(
        metadata={
            "help": "`arrow_chase` (the bundled synthetic visual task, rendered into `--data_dir`), a Coconut JSON "
            "file, a folder of `<name>_<split>.json` Coconut files, a local JSON/JSONL file of records, or a Hub "
            "dataset id (`HuggingFaceM4/A-OKVQA` uses the A-OKVQA loader)."
        }
    )
    split: str = field(default="test", metadata={"help": "Split to evaluate (picks the file in a folder)."})
    data_dir: str = field(
        default="outputs/data/arrow_chase", metadata={"help": "Where `arrow_chase` images are rendered."}
    )
    synthetic_grid_size: int = field(
        default=4, metadata={"help": "`arrow_chase`: cells per side of the board (the demo of train_sft.py uses 2)."}
    )
    synthetic_max_hops: int = field(
        default=6, metadata={"help": "`arrow_chase`: most arrows per question (the demo of train_sft.py uses 3)."}
    )
    aokvqa_target: str = field(
        default="multiple_choice",
        metadata={"help": "A-OKVQA answer target.", "choices": ["multiple_choice", "direct"]},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where results go; default `<model>/eval` (or `outputs/eval` for a Hub id)."}
    )
    update_model_card: bool = field(
        default=False, metadata={"help": "Write the results table into the local model folder's README.md."}
    )
    device: str | None = field(default=None, metadata={"help": "Device to run on, e.g. `cuda`; default CPU."})


def load_eval_records(
    dataset: str,
    split: str,
    aokvqa_target: str = "multiple_choice",
    data_dir: str = "outputs/data/arrow_chase",
    task: SyntheticTaskConfig | None = None,
):
    """The records of `dataset`'s `split`, with the loader that fits the source."""
    if dataset == "arrow_chase":
        return build_synthetic_split(data_dir, split, task)
    return load_split(dataset, split, aokvqa_target)


def main(script_args: ScriptArguments, curriculum: CurriculumConfig, eval_config: CoconutEvalConfig) -> EvalResults:
    task = SyntheticTaskConfig(grid_size=script_args.synthetic_grid_size, max_hops=script_args.synthetic_max_hops)
    records = load_eval_records(
        script_args.dataset, script_args.split, script_args.aokvqa_target, script_args.data_dir, task
    )
    if script_args.max_samples is not None:
        records = records.select(range(min(script_args.max_samples, len(records))))
    model, processing_class = load_model_and_processor(script_args.model, device=script_args.device)
    result = evaluate_stage(model, processing_class, records, curriculum, eval_config)
    results = EvalResults([result])

    local_model = Path(script_args.model).is_dir()
    output_dir = script_args.output_dir or (str(Path(script_args.model) / "eval") if local_model else "outputs/eval")
    paths = results.save(output_dir)
    if script_args.update_model_card:
        if not local_model:
            raise ValueError(f"`--update_model_card` needs a local model folder; {script_args.model!r} is not one.")
        write_table_into_card(Path(script_args.model) / "README.md", results.markdown_table())
    print(results.markdown_table())
    logger.info("Wrote %s", ", ".join(str(path) for path in paths.values()))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((ScriptArguments, CurriculumConfig, CoconutEvalConfig))
    main(*parser.parse_args_and_config())
