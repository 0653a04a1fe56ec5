"""Evaluate a Coconut-InternVL model on a reasoning dataset: accuracy, generated tokens and speed at one stage.

A model trained by `train_sft.py` carries `coconut_training.json`: its curriculum (`--method`, `--c_thought`,
`--max_latent_stage`, `--pad_latent_to_max`), the stage it reached, its dataset and, for the bundled arrow-chase task,
the task's settings (board size, hops, seed). Every flag left out defaults to what the record says, so the model is
evaluated as it was trained; a flag given overrides it.

```bash
# The model `python train_sft.py` trains, on the test split of its own arrow-chase task, at the stage it reached
python evaluate.py --model outputs/demo

# ProsQA test split (Coconut JSON files `prosqa_<split>.json` in a folder), the Coconut prompt of stage 6
python evaluate.py --model outputs/prosqa --dataset data/prosqa --split test --stage 6 --max_latent_stage 6

# A fixed number of continuous thoughts instead of a stage, results written to outputs/eval
python evaluate.py --model outputs/prosqa --dataset data/prosqa/prosqa_valid.json --num_latent_thoughts 6 \\
    --output_dir outputs/eval

# The stop head (a model trained with `--latent_stop_head`) chooses each question's number of thoughts, up to 6
python evaluate.py --model outputs/prosqa --dataset data/prosqa --split test --num_latent_thoughts auto \\
    --max_latent_thoughts 6

# A chain-of-thought baseline, and A-OKVQA from the Hub (direct-answer scores use the 10 annotators' answers)
python evaluate.py --model outputs/cot --dataset data/prosqa --split test --method cot
python evaluate.py --model my/coconut-internvl3-1b --dataset HuggingFaceM4/A-OKVQA --split validation --stage 3

# A YAML file whose keys are the flags' names works too
python evaluate.py --config my_eval.yaml
```

Writes `eval_results.json`, `eval_results.png`, `eval_results.md` and the predictions to `--output_dir` (default:
`<model>/eval` for a local model), and with `--update_model_card` puts the table into the model's README.md. The
metrics hold the mean and most thoughts a question got (`mean_latent_thoughts`, `max_latent_thoughts`) and, for a
coconut model with a stop head, how often the head chose the count of the curriculum's final stage (`stop_accuracy`).
"""

import json
import logging
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from trl import TrlParser

from coconut.convert import require_coconut_checkpoint, require_full_model
from coconut.curriculum import CurriculumConfig
from coconut.data import load_split
from coconut.eval_config import CoconutEvalConfig, check_eval_model, check_eval_settings
from coconut.eval_prompts import eval_prompt
from coconut.evaluation import evaluate_stage
from coconut.hub import is_local_path
from coconut.interventions import INTERVENTIONS, check_interventions, evaluate_interventions
from coconut.loading import check_weight_files, load_model_and_processor
from coconut.model_card import write_table_into_card
from coconut.preflight import check_writable, require_at_least
from coconut.repository import read_training_record
from coconut.results import EvalResults
from coconut.step_supervision import THOUGHT_DECODER_DIR
from coconut.synthetic import SyntheticTaskConfig, build_synthetic_split
from coconut.thought_reader import load_thought_decoder, read_thoughts, reader_scores
from processing_coconut_internvl import is_auto


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "Local folder or Hub id of a Coconut-InternVL model."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "`arrow_chase` (the bundled synthetic visual task, rendered into `--data_dir`), a Coconut JSON "
            "file, a folder of `<name>_<split>.json` Coconut files, a local JSON/JSONL file of records, or a Hub "
            "dataset id (`HuggingFaceM4/A-OKVQA` uses the A-OKVQA loader). Default: the model's training dataset."
        },
    )
    split: str = field(default="test", metadata={"help": "Split to evaluate (picks the file in a folder)."})
    data_dir: str = field(
        default="outputs/data/arrow_chase", metadata={"help": "Where `arrow_chase` images are rendered."}
    )
    synthetic_grid_size: int | None = field(
        default=None,
        metadata={"help": "`arrow_chase`: cells per side of the board. Default: the model's training task, else 4."},
    )
    synthetic_max_hops: int | None = field(
        default=None,
        metadata={"help": "`arrow_chase`: most arrows per question. Default: the model's training task, else 6."},
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
    interventions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Causal test of the thoughts (coconut models): answer the split again with every fed-back thought "
            f"replaced, once per name: {', '.join(INTERVENTIONS)}. Accuracies go to eval_results.json "
            "(`interventions`)."
        },
    )
    read_thoughts: bool | None = field(
        default=None,
        metadata={
            "help": "Decode each thought into text and score it against its step (`thought_reader` in "
            "eval_results.json), with the model's thought_decoder/ when it has one, else its own LM head. Default: "
            "on when the model folder has a thought_decoder/."
        },
    )
    intervention_seed: int = field(default=0, metadata={"help": "Seed of the `noise` intervention."})

    def __post_init__(self):
        require_at_least(self, 1, {"max_samples": "leave it out to evaluate the whole split"})
        check_interventions(self.interventions)
        if self.update_model_card and not Path(self.model).is_dir():
            raise ValueError(
                f"`--update_model_card` writes into a local model folder's README.md; {self.model!r} is not one. Drop "
                "the flag (the table is printed and saved in `--output_dir`), or evaluate a local copy."
            )

    @property
    def results_dir(self) -> str:
        """`--output_dir`, else `<model>/eval` for a local model folder, else `outputs/eval`."""
        if self.output_dir:
            return self.output_dir
        return str(Path(self.model) / "eval") if Path(self.model).is_dir() else "outputs/eval"


# The fields of `CurriculumConfig`, each defaulting to `None` ("not given"), so that the model's saved curriculum
# fills the flags left out.
CurriculumArguments = make_dataclass(
    "CurriculumArguments",
    [
        (
            item.name,
            item.type | None,
            field(default=None, metadata={**item.metadata, "help": item.metadata["help"] + " Default: the model's."}),
        )
        for item in fields(CurriculumConfig)
    ],
)


def check_model(model: str) -> dict | None:
    """Fail fast on a model that cannot be loaded, before any data is rendered; returns its training record.

    A local folder must hold a Coconut-InternVL `config.json` (a plain InternVL is refused: convert it first) and
    readable weights; a path that does not exist is an error naming it (a string is taken for a Hub id only when it
    looks like one, `namespace/name`, and is no local path).
    """
    path = Path(model)
    if path.is_dir():
        require_full_model(path, f"`--model` {model!r}")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"`--model` folder {model!r} has no config.json: pass the folder that train_sft.py (`--output_dir`) "
                "or convert_to_coconut.py saved the model in."
            )
        require_coconut_checkpoint(model)
        check_weight_files(path)
        return read_training_record(path)
    if is_local_path(model):
        raise ValueError(
            f"`--model` {model!r} does not exist: pass a model folder (train_sft.py writes one in its `--output_dir`) "
            "or a Hub id `namespace/name`."
        )
    try:
        require_coconut_checkpoint(model)
        return read_training_record(model)
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as error:
        raise ValueError(
            f"`--model` {model!r} is no local folder, and the Hub has no model of that id we can read "
            f"({type(error).__name__}: {error}). Check the id (and `huggingface-cli login` for a private one)."
        ) from error


def check_dataset_flags(script_args: ScriptArguments, dataset: str | None) -> None:
    """Refuse the flags of one kind of dataset given for another (`dataset`: the flag's, else the model's training
    dataset): they would be ignored."""
    if dataset is None:
        return
    defaults = {item.name: item.default for item in fields(ScriptArguments)}
    names = ("synthetic_grid_size", "synthetic_max_hops", "data_dir")
    given = {name: getattr(script_args, name) for name in names if getattr(script_args, name) != defaults[name]}
    if given and dataset != "arrow_chase":
        raise ValueError(
            f"{', '.join(f'`--{name}`={value!r}' for name, value in given.items())} set the bundled task's questions, "
            f"but the dataset is {dataset!r}: they would be ignored. Drop them, or pass `--dataset arrow_chase`."
        )
    if script_args.aokvqa_target != defaults["aokvqa_target"] and "a-okvqa" not in dataset.lower():
        raise ValueError(
            f"`--aokvqa_target`={script_args.aokvqa_target!r} sets A-OKVQA's answers, but the dataset is {dataset!r}: "
            "it would be ignored. Drop it."
        )


def settings_from_record(
    record: dict | None,
    script_args: ScriptArguments,
    curriculum_args,
    eval_config: CoconutEvalConfig,
) -> tuple[str, CurriculumConfig, SyntheticTaskConfig]:
    """The dataset, curriculum and task to evaluate with: the flags given, else the model's training record."""
    record = record or {}
    given = {name: value for name, value in vars(curriculum_args).items() if value is not None}
    curriculum = CurriculumConfig(**{**record.get("curriculum", {}), **given})
    task_settings = dict(record.get("task") or {})
    for name, value in (("grid_size", script_args.synthetic_grid_size), ("max_hops", script_args.synthetic_max_hops)):
        if value is not None:
            task_settings[name] = value
    task = SyntheticTaskConfig(**task_settings)
    dataset = script_args.dataset or record.get("dataset")
    if dataset is None:
        raise ValueError(
            f"`--dataset` is missing, and {script_args.model!r} has no training record to take it from: pass "
            "`--dataset arrow_chase`, a Coconut JSON file or folder, a JSON/JSONL file or a Hub dataset id."
        )
    if eval_config.stage is None and eval_config.num_latent_thoughts is None and "stage" in record:
        eval_config.stage = record["stage"]
    if record:
        logger.info(
            "Settings of %s (flags given override its training record): dataset %s, %s, stage %s%s",
            script_args.model,
            dataset,
            curriculum,
            eval_config.stage,
            f", {task}" if dataset == "arrow_chase" else "",
        )
    return dataset, curriculum, task


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


def main(script_args: ScriptArguments, curriculum_args, eval_config: CoconutEvalConfig) -> EvalResults:
    record = check_model(script_args.model)
    check_dataset_flags(script_args, script_args.dataset or (record or {}).get("dataset"))
    dataset, curriculum, task = settings_from_record(record, script_args, curriculum_args, eval_config)
    check_eval_settings(curriculum, eval_config)
    read = check_thought_arguments(script_args, curriculum, eval_config)
    output_dir = script_args.results_dir
    check_writable(output_dir)  # before any data is rendered or generated
    model, processing_class = load_model_and_processor(script_args.model, device=script_args.device)
    check_eval_model(model, eval_config)  # e.g. "auto" without a stop head, before any data is rendered
    records = load_eval_records(dataset, script_args.split, script_args.aokvqa_target, script_args.data_dir, task)
    if script_args.max_samples is not None:
        records = records.select(range(min(script_args.max_samples, len(records))))
    result = evaluate_stage(model, processing_class, records, curriculum, eval_config)
    results = EvalResults([result])
    max_new_tokens = result.metrics["max_new_tokens"]  # the interventions generate as much as the unchanged run
    thought_results = evaluate_thoughts(
        script_args, read, model, processing_class, records, curriculum, eval_config, max_new_tokens
    )

    paths = results.save(output_dir)
    tables = [results.markdown_table()]
    if thought_results:
        add_to_results_file(paths["json"], thought_results)
        tables += thought_tables(result.metrics["accuracy"], thought_results)
    if script_args.update_model_card:
        write_table_into_card(Path(script_args.model) / "README.md", results.markdown_table())
        write_thought_sections(Path(script_args.model) / "README.md", thought_results, result.metrics["accuracy"])
    print("\n\n".join(tables))
    logger.info("Wrote %s", ", ".join(str(path) for path in paths.values()))
    return results


def check_thought_arguments(script_args: ScriptArguments, curriculum: CurriculumConfig, eval_config) -> bool:
    """Whether the thoughts are read; interventions and reading need a coconut model with a fixed count."""
    has_decoder = Path(script_args.model, THOUGHT_DECODER_DIR).is_dir()
    read = script_args.read_thoughts if script_args.read_thoughts is not None else has_decoder
    if (script_args.interventions or read) and curriculum.method != "coconut":
        raise ValueError(
            f"`--interventions`/`--read_thoughts` with `method`={curriculum.method!r}: only a coconut model feeds "
            "thoughts back. Drop the flags, or evaluate a coconut model."
        )
    if (script_args.interventions or read) and is_auto(eval_config.num_latent_thoughts):
        raise ValueError(
            "`--interventions`/`--read_thoughts` with `--num_latent_thoughts auto`: the thoughts are replaced or read "
            "at a fixed count. Pass a stage or a number of thoughts."
        )
    return read


def evaluate_thoughts(
    script_args, read: bool, model, processing_class, records, curriculum, eval_config, max_new_tokens: int
) -> dict:
    """The interventions' accuracies and the thought reader's scores (with three decoded examples), as asked."""
    thought_results = {}
    if script_args.interventions:
        prompts = [eval_prompt(processing_class, record, curriculum, eval_config)["prompt"] for record in records]
        details = evaluate_interventions(
            model,
            processing_class,
            records,
            prompts,
            script_args.interventions,
            max_new_tokens=max_new_tokens,
            batch_size=eval_config.batch_size,
            seed=script_args.intervention_seed,
        )
        thought_results["interventions"] = {name: row["accuracy"] for name, row in details.items()}
        thought_results["intervention_details"] = details
    if read:
        decoder, source = load_thought_decoder(script_args.model, model, model.device)
        stage = eval_config.stage if eval_config.num_latent_thoughts is None else curriculum.max_latent_stage + 1
        readings = read_thoughts(model, processing_class, decoder, records, curriculum, stage, eval_config.batch_size)
        thought_results["thought_reader"] = {**reader_scores(readings), "decoder": source, "examples": readings[:3]}
    return thought_results


def add_to_results_file(path: Path, thought_results: dict) -> None:
    """Add `interventions` and `thought_reader` to eval_results.json."""
    saved = json.loads(Path(path).read_text())
    saved.update(thought_results)
    Path(path).write_text(json.dumps(saved, indent=2) + "\n")


def write_thought_sections(card_path: Path, thought_results: dict, accuracy: float) -> None:
    """The interventions and the decoded thoughts, each in a card section of its own."""
    names = [name for name in ("interventions", "thought_reader") if name in thought_results]
    sections = {"interventions": ("## Thought interventions", "thought-interventions"),
                "thought_reader": ("## Decoded thoughts", "decoded-thoughts")}  # fmt: skip
    for name, table in zip(names, thought_tables(accuracy, thought_results), strict=True):
        heading, section = sections[name]
        write_table_into_card(card_path, table, heading=heading, section=section)


def thought_tables(accuracy: float, thought_results: dict) -> list[str]:
    """Markdown: accuracy under each intervention beside the unchanged run; the reader's scores and examples."""
    tables = []
    if "interventions" in thought_results:
        rows = [f"| unchanged | {100 * accuracy:.1f} |"]
        rows += [f"| {name} | {100 * value:.1f} |" for name, value in thought_results["interventions"].items()]
        tables.append("| thoughts | accuracy (%) |\n|---|---|\n" + "\n".join(rows))
    if "thought_reader" in thought_results:
        reader = thought_results["thought_reader"]
        by_step = " / ".join(f"{100 * value:.1f}" for value in reader["right_cell_by_step"].values())
        lines = [
            f"Thoughts decoded by {reader['decoder']}: {100 * (reader['right_cell'] or 0):.1f} % name the right cell "
            f"({by_step} % for thoughts {' / '.join(reader['right_cell_by_step'])}; {reader['num_thoughts']} thoughts).",
            "",
            "| question | thought | decoded | gold step |",
            "|---|---|---|---|",
        ]
        for example in reader["examples"]:
            for thought in example["thoughts"]:
                lines.append(f"| {example['id']} | {thought['step']} | {thought['text']} | {thought['gold']} |")
        tables.append("\n".join(lines))
    return tables


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((ScriptArguments, CurriculumArguments, CoconutEvalConfig))
    main(*parser.parse_args_and_config())
