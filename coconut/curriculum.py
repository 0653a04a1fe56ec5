"""The Coconut curriculum: which reasoning steps a training example keeps and how many continuous thoughts replace them.

Semantics follow the paper (Hao et al. 2024, arXiv 2412.06769) and its reference code (`get_cot_latent_dataset`,
`get_question_latent_dataset`):

- stage 0 is the full chain of thought;
- stage `k` (`1 <= k <= max_latent_stage`) drops the first `k` steps and puts `k * c_thought` `<|latent|>` tokens between
  `<|start-latent|>` and `<|end-latent|>` at the start of the assistant turn (also when the record has fewer than `k`
  steps, as in the reference code);
- past `max_latent_stage` every step is dropped and the thoughts are capped at `max_latent_stage * c_thought`, or at
  `min(num_steps, max_latent_stage) * c_thought` unless `pad_latent_to_max`;
- with probability `uniform_prob` a training sample uses a stage drawn uniformly from `0..num_steps` instead.

An example is built as text pieces, `prompt` (chat template, image placeholders, question, latent block) and `completion`
(remaining steps each followed by a newline, then `### ` + answer + EOS): the trainer's collator tokenizes them with the
processor, which expands image placeholders into image tokens (see [`coconut.collator.CoconutDataCollator`]).
"""

import random
from dataclasses import dataclass, field, replace

from processing_coconut_internvl import ANSWER_MARKER, chat_prompt, latent_block


METHODS = ("coconut", "cot", "no_cot", "pause_as_thought", "no_thought")


@dataclass
class CurriculumConfig:
    r"""
    Settings of the Coconut curriculum (the paper's Table/appendix names).

    `method` picks the training recipe:

    - `"coconut"`: the staged curriculum above; the model feeds its last hidden state back at each `<|latent|>`.
    - `"cot"`: always stage 0, without latent markers (the paper's CoT baseline).
    - `"no_cot"`: no steps, no latent tokens, no markers: the question straight to `### answer`.
    - `"pause_as_thought"`: the coconut layout, but the `<|latent|>` tokens are ordinary learned "pause" tokens: the
      trainer sets `config.latent_token_id=None` so the model does not feed hidden states back (the paper's
      "pause as thought" baseline). The text produced here is the same as for `"coconut"`.
    - `"no_thought"`: the paper's "w/o thought" ablation: the curriculum drops the first steps as coconut does, but
      nothing takes their place, no `<|latent|>` tokens and no markers (the reference code's `no_thoughts: true`);
      evaluation prompts are the question alone.
    """

    method: str = field(
        default="coconut",
        metadata={"help": "Training recipe.", "choices": list(METHODS)},
    )
    c_thought: int = field(
        default=1, metadata={"help": "Continuous thoughts per replaced reasoning step (the paper's c)."}
    )
    max_latent_stage: int = field(
        default=3,
        metadata={"help": "Last stage that replaces steps one by one; later stages drop every step."},
    )
    pad_latent_to_max: bool = field(
        default=False,
        metadata={
            "help": "Past max_latent_stage, always use max_latent_stage * c_thought thoughts, even for records with "
            "fewer steps (and likewise in evaluation prompts)."
        },
    )
    uniform_prob: float = field(
        default=0.0,
        metadata={"help": "Probability that a training sample uses a stage drawn uniformly from 0..num_steps."},
    )

    def __post_init__(self):
        self.validate_curriculum()

    def validate_curriculum(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if self.c_thought < 1:
            raise ValueError(f"`c_thought` must be >= 1, got {self.c_thought}.")
        if self.max_latent_stage < 0:
            raise ValueError(f"`max_latent_stage` must be >= 0, got {self.max_latent_stage}.")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"`uniform_prob` must be in [0, 1], got {self.uniform_prob}.")

    @property
    def uses_markers(self) -> bool:
        """Whether examples carry the `<|start-latent|>`/`<|end-latent|>` pair (coconut and pause_as_thought)."""
        return self.method in ("coconut", "pause_as_thought")

    @property
    def staged(self) -> bool:
        """Whether the curriculum stage changes the examples (every method but cot and no_cot)."""
        return self.method not in ("cot", "no_cot")


@dataclass(frozen=True)
class LatentLayout:
    """How one record is laid out at one stage: steps dropped from the front, thoughts inserted, markers or not."""

    num_skipped_steps: int
    num_latents: int
    markers: bool

    @property
    def block(self) -> str:
        """`<|start-latent|>` + n x `<|latent|>` + `<|end-latent|>`, or an empty string for layouts without markers."""
        return latent_block(self.num_latents) if self.markers else ""


def training_layout(num_steps: int, stage: int, config: CurriculumConfig) -> LatentLayout:
    """The layout of a training example with `num_steps` reasoning steps at curriculum `stage`."""
    if stage < 0:
        raise ValueError(f"`stage` must be >= 0, got {stage}.")
    if config.method == "cot":
        return LatentLayout(0, 0, markers=False)
    if config.method == "no_cot":
        return LatentLayout(num_steps, 0, markers=False)
    if stage > config.max_latent_stage:
        num_skipped = num_steps
        num_thoughts = config.max_latent_stage if config.pad_latent_to_max else min(num_steps, config.max_latent_stage)
    else:
        num_skipped, num_thoughts = min(stage, num_steps), stage
    num_latents = num_thoughts * config.c_thought if config.uses_markers else 0
    return LatentLayout(num_skipped, num_latents, config.uses_markers)


def evaluation_layout(num_steps: int, stage: int, config: CurriculumConfig) -> LatentLayout:
    """The layout of an evaluation prompt: thoughts capped at the record's step count unless `pad_latent_to_max`.

    As in the reference code's `get_question_latent_dataset`, the cap uses the number of gold steps, so a record
    with two steps is evaluated with two thoughts at stage three.
    """
    if stage < 0:
        raise ValueError(f"`stage` must be >= 0, got {stage}.")
    if not config.staged:
        return LatentLayout(num_steps if config.method == "no_cot" else 0, 0, markers=False)
    cap = config.max_latent_stage if config.pad_latent_to_max else min(config.max_latent_stage, num_steps)
    num_thoughts = min(cap, stage)
    num_latents = num_thoughts * config.c_thought if config.uses_markers else 0
    return LatentLayout(min(num_thoughts, num_steps), num_latents, config.uses_markers)


def sample_stage(stage: int, num_steps: int, config: CurriculumConfig, rng: random.Random | None = None) -> int:
    """The stage a training sample uses: `stage`, or with probability `uniform_prob` a uniform draw from 0..num_steps.

    `rng` is required when `config.uniform_prob > 0` so runs are reproducible (seed it per sample or per epoch).
    """
    if config.uniform_prob == 0.0 or not config.staged:
        return stage
    if rng is None:
        raise ValueError(
            f"`rng` is required when `uniform_prob` > 0 (got {config.uniform_prob}); pass a seeded random.Random."
        )
    if rng.random() < config.uniform_prob:
        return rng.randint(0, num_steps)
    return stage


def question_prompt(record: dict, tokenizer) -> str:
    """The chat-formatted prompt of a record up to the start of the assistant turn (no latent block)."""
    num_images = len(record.get("images") or [])
    return chat_prompt(tokenizer, record["question"], num_images, record_name=_record_name(record))


def build_training_example(
    record: dict,
    stage: int,
    tokenizer,
    config: CurriculumConfig,
    rng: random.Random | None = None,
    prompt: str | None = None,
) -> dict:
    """The training example for `record` at curriculum `stage`, as text pieces.

    Args:
        record (`dict`): a record of the [`coconut.data.RECORD_FEATURES`] schema (`question`, `steps`, `answer`,
            `images`, ...).
        stage (`int`): the scheduled curriculum stage; `uniform_prob` may replace it (see [`sample_stage`]).
        tokenizer: a tokenizer with InternVL's chat template and an `eos_token`.
        config ([`CurriculumConfig`]): the curriculum settings.
        rng (`random.Random`, *optional*): required when `config.uniform_prob > 0`.
        prompt (`str`, *optional*): the record's [`question_prompt`], when the caller keeps it (it does not change
            with the stage).

    Returns:
        `dict` with `prompt` (chat template + question + latent block), `completion` (remaining steps, each followed
        by a newline, then `### ` + answer + EOS), `images` (the record's images, in placeholder order), `stage`
        (the stage actually used), `num_latents`, `teaches_stop` (see [`teaches_stop`]) and `replaced_steps`
        (see [`replaced_steps`]).

    Example:

    ```python
    >>> from coconut.curriculum import CurriculumConfig, build_training_example
    >>> record = {"question": "Is Tom a wumpus?", "steps": ["Tom is a rempus.", "Every rempus is a wumpus."],
    ...           "answer": "Tom is a wumpus.", "images": []}
    >>> example = build_training_example(record, 1, tokenizer, CurriculumConfig(c_thought=2))
    >>> example["prompt"][-50:], example["completion"]
    ('...<|im_start|>assistant\\n<|start-latent|><|latent|><|latent|><|end-latent|>',
     'Every rempus is a wumpus.\\n### Tom is a wumpus.<|im_end|>')
    ```
    """
    steps = list(record.get("steps") or [])
    used_stage = sample_stage(stage, len(steps), config, rng)
    layout = training_layout(len(steps), used_stage, config)
    answer = record.get("answer")
    if answer is None:
        raise ValueError(f"{_record_name(record)}: no answer; every training record needs `answer`.")
    completion = "".join(step + "\n" for step in steps[layout.num_skipped_steps :])
    completion += ANSWER_MARKER + answer + tokenizer.eos_token
    return {
        "prompt": (prompt if prompt is not None else question_prompt(record, tokenizer)) + layout.block,
        "completion": completion,
        "images": list(record.get("images") or []),
        "stage": used_stage,
        "num_latents": layout.num_latents,
        "teaches_stop": teaches_stop(len(steps), layout, config),
        "replaced_steps": replaced_steps(steps, layout, config),
    }


def replaced_steps(steps: list[str], layout: LatentLayout, config: CurriculumConfig) -> list[str]:
    """The dropped steps that have thoughts in the block, in order: step `i` (from 0) is replaced by the thoughts
    `i * c_thought .. (i + 1) * c_thought - 1`. A stage past a record's step count gives it thoughts that replace no
    step (the reference layout), and `no_thought` drops steps without thoughts; neither appears here."""
    if layout.num_latents == 0:
        return []
    return list(steps[: min(layout.num_skipped_steps, layout.num_latents // config.c_thought)])


def teaches_stop(num_steps: int, layout: LatentLayout, config: CurriculumConfig) -> bool:
    """Whether an example's latent block may teach the stop head where a block ends: its thoughts replace every one of
    the record's steps, and there are as many as the final stage gives the record (min(steps, max_latent_stage) x c).

    That holds at the final stage for every record, and at stage k for the records with exactly k steps. Elsewhere the
    block length is the stage's, not the question's: at stage 2 a record with 4 steps gets 2 thoughts and writes the
    other 2 steps, and one with 1 step gets 2 thoughts for it.
    """
    if config.method != "coconut" or layout.num_latents == 0 or layout.num_skipped_steps != num_steps:
        return False
    return layout.num_latents == evaluation_layout(num_steps, config.max_latent_stage + 1, config).num_latents


def build_eval_prompt(record: dict, stage: int, tokenizer, config: CurriculumConfig) -> dict:
    """The evaluation prompt for `record` at `stage`: chat prompt and latent block, nothing of the answer.

    Returns:
        `dict` with `prompt`, `images` and `num_latents`. The model generates the remaining steps (if any), then
        `### ` and the answer.
    """
    layout = evaluation_layout(len(record.get("steps") or []), stage, config)
    return {
        "prompt": question_prompt(record, tokenizer) + layout.block,
        "images": list(record.get("images") or []),
        "num_latents": layout.num_latents,
    }


def max_example_length(record: dict, tokenizer, config: CurriculumConfig, image_token_count: int = 0) -> int:
    """The longest training example of `record` over all curriculum stages, in tokens.

    Each image adds `image_token_count` tokens (what the processor puts in place of a placeholder, e.g.
    `2 + image_seq_length * num_tiles` for InternVL); the placeholder's own tokens are counted too, so this is an
    upper bound for records with images.
    """
    num_steps = len(record.get("steps") or [])
    num_images = len(record.get("images") or [])
    longest = 0
    # Stages above max_latent_stage + 1 share its layout; uniform sampling only draws stages up to num_steps.
    for stage in range(max(config.max_latent_stage + 1, num_steps) + 1):
        example = build_training_example(record, stage, tokenizer, replace(config, uniform_prob=0.0))
        text = example["prompt"] + example["completion"]
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + num_images * image_token_count
        longest = max(longest, length)
    return longest


def _record_name(record: dict) -> str:
    return f"Record {record['id']!r}" if record.get("id") is not None else "Record"


__all__ = [
    "METHODS",
    "CurriculumConfig",
    "LatentLayout",
    "build_eval_prompt",
    "build_training_example",
    "evaluation_layout",
    "max_example_length",
    "question_prompt",
    "replaced_steps",
    "sample_stage",
    "training_layout",
]
