"""Arrow chase: the bundled synthetic visual multi-hop task, the project's embedded default.

The image is a square grid of coloured cells (4 x 4 cells of 14 px in a 56 px image by default, so one cell is one
InternViT patch). Each cell's colour is a direction, also drawn as a dark arrow: red right, blue down, green left,
yellow up. Moves wrap around the edges. Cells are named like a chess board: column letter, row number (`A1` top left,
`D4` bottom right).

Question: "Start at B3 and follow 4 arrows. Where do you stop?" The answer is a cell name (exact match). Each of the
2 to 6 hops is one reasoning step, "B3 points right to C3.". Only the image says where an arrow points, so the
question cannot be answered without it, and with the final cell close to uniform over the grid, guessing gets about
1/16 right (see [`majority_baseline`]); answering without writing the steps means composing up to six look-ups in
one forward pass.

The splits never share a question. Every question (board, start cell, number of arrows) belongs to one split by a
fixed hash of the question alone ([`question_split`]: by default 10 % of all questions are validation questions, 30 %
test questions, the rest training questions), whatever the seed or the split sizes. A small board has few questions
(a 2 x 2 board with 2 or 3 arrows: 256 boards x 4 starts x 2 hop counts = 2048), so splits drawn independently
would overlap heavily; with the partition a model never trains on a question it is tested on. Each split is drawn
by its own seeded RNG from its part of the question space: the training split with repeats (as independent draws),
the validation and test splits as distinct questions. Splits are rendered on demand into a caller-given folder, and
the records point at the PNG files.

The `branching` variant (`SyntheticTaskConfig(variant="branching")`, a board of at least 3 x 3) asks for a search:
every cell holds two arrows, drawn as its top and bottom halves, and a path may take either one at each cell. "Start
at A1 and follow 3 arrows. Which can you reach, B2 or C3?": exactly one of the two cells is the end of some path of
that many arrows. The steps write one such path; choosing a wrong arrow early leads to neither cell, so writing the
path step by step needs the search done before the first step, while a continuous thought can keep several frontiers.

The `dot` variant (`SyntheticTaskConfig(variant="dot")`, a board of at least max_hops + 3 cells) does not say how
many arrows to follow: three cells carry a white dot (in their top-left corner, clear of the arrow), and "Start at B3
and follow the arrows until you reach a cell with a dot. Where do you stop?" has the first dotted cell on the path as
its answer. The path visits distinct cells up to that dot, reached after 2 to 6 arrows, one step each as in `chase`;
the two other dots lie off the path. How many steps a question takes is only known by following the arrows, so a
model cannot plan its number of thoughts from the question.
"""

import hashlib
import math
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from PIL import Image, ImageDraw

from coconut.data import records_to_dataset, validate_dataset
from coconut.tokenizer import train_tokenizer


DIRECTIONS = {"right": (0, 1), "down": (1, 0), "left": (0, -1), "up": (-1, 0)}  # (row, column) offsets
COLOURS = {"right": (220, 50, 40), "down": (40, 90, 220), "left": (40, 160, 60), "up": (235, 195, 30)}
SPLITS = ("train", "validation", "test")
VARIANTS = ("chase", "branching", "dot")
# The two arrows of a cell in the branching variant, in DIRECTIONS order (top half, bottom half of the cell).
ARROW_PAIRS = [(a, b) for i, a in enumerate(DIRECTIONS) for b in list(DIRECTIONS)[i + 1 :]]
COLUMN_LETTERS = "ABCDEFGH"
# The dot variant: dotted cells per board (the target and two decoys off the path), and how many boards to draw for
# one path through distinct cells before calling the setting impossible in practice (on a 3 x 3 board, one board in 16
# has a path of 6 arrows through 7 distinct cells; on a 4 x 4 board, one in a thousand for 12 arrows).
NUM_DOTS = 3
MAX_DOT_BOARD_DRAWS = 100_000


@dataclass
class SyntheticTaskConfig:
    """Size and difficulty of the arrow-chase task."""

    variant: str = field(
        default="chase",
        metadata={
            "help": "'chase' (one arrow per cell, where do you stop?), 'branching' (two arrows per cell, which of "
            "two cells can you reach?) or 'dot' (one arrow per cell, where is the first dotted cell you reach?).",
            "choices": list(VARIANTS),
        },
    )
    image_size: int = field(default=56, metadata={"help": "Image side in pixels (InternVL tiles are resized to it)."})
    grid_size: int = field(default=4, metadata={"help": "Cells per side; image_size must be a multiple of it."})
    min_hops: int = field(default=2, metadata={"help": "Fewest reasoning steps (arrows to follow)."})
    max_hops: int = field(default=6, metadata={"help": "Most reasoning steps (arrows to follow)."})
    seed: int = field(default=0, metadata={"help": "Seed of the split generators."})
    train_size: int = field(default=1500, metadata={"help": "Records in the train split."})
    validation_size: int = field(default=200, metadata={"help": "Records in the validation split."})
    test_size: int = field(default=500, metadata={"help": "Records in the test split (distinct questions)."})
    validation_share: float = field(
        default=0.1, metadata={"help": "Share of all questions reserved for the validation split."}
    )
    test_share: float = field(default=0.3, metadata={"help": "Share of all questions reserved for the test split."})

    def __post_init__(self):
        self.validate_synthetic()

    def validate_synthetic(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {self.variant!r}.")
        if self.variant == "branching" and self.grid_size < 3:
            raise ValueError(
                f"`grid_size`={self.grid_size}: the branching variant needs a board of at least 3 x 3 (on 2 x 2, "
                "moves wrap so that left equals right and up equals down, and two arrows reach every cell)."
            )
        if not 2 <= self.grid_size <= len(COLUMN_LETTERS):
            raise ValueError(f"`grid_size` must be in [2, {len(COLUMN_LETTERS)}], got {self.grid_size}.")
        if self.image_size % self.grid_size:
            step = 28 * self.grid_size  # whole 28-pixel image tokens of the tiny model per cell
            raise ValueError(
                f"`image_size`={self.image_size} must be a multiple of `grid_size`={self.grid_size} so cells have "
                f"equal sizes; e.g. image_size={step * max(1, round(self.image_size / step))} (a multiple of 28 x "
                "grid_size also gives each cell whole image tokens of the tiny model)."
            )
        if not 1 <= self.min_hops <= self.max_hops:
            raise ValueError(f"Need 1 <= `min_hops` <= `max_hops`, got {self.min_hops} and {self.max_hops}.")
        if self.variant == "dot" and self.grid_size**2 < self.max_hops + NUM_DOTS:
            side = math.isqrt(self.max_hops + NUM_DOTS - 1) + 1
            raise ValueError(
                f"`grid_size`={self.grid_size} and `max_hops`={self.max_hops}: the dot variant needs grid_size**2 >= "
                f"max_hops + 3 (a path of max_hops arrows through max_hops + 1 distinct cells, and two dots off it), "
                f"got {self.grid_size**2} < {self.max_hops + NUM_DOTS}. Lower `max_hops` to "
                f"{self.grid_size**2 - NUM_DOTS} or use a {side} x {side} board (`grid_size`={side}); a 3 x 3 board "
                "takes up to 6 arrows."
            )
        for split in SPLITS:
            if self.split_size(split) < 0:
                raise ValueError(f"`{split}_size` must be >= 0, got {self.split_size(split)}.")
        if not (0 < self.validation_share and 0 < self.test_share and self.validation_share + self.test_share < 1):
            raise ValueError(
                f"`validation_share`={self.validation_share} and `test_share`={self.test_share} must be positive and "
                "leave a share for training (their sum below 1)."
            )

    def check_split_fits(self, split: str, num_records: int | None = None) -> None:
        """Raise a `ValueError` when `num_records` (default: the split's size) distinct validation or test questions
        cannot be drawn from the split's share of the question space (more than 90 % of it: drawing would stall)."""
        num_records = self.split_size(split) if num_records is None else num_records
        available = self.num_questions * self.share(split)
        if split != "train" and num_records > 0.9 * available:
            raise ValueError(
                f"{num_records} distinct {split} questions (`{split}_size`, `--synthetic_{split}_size` in "
                f"train_sft.py) do not fit in the {split} share of the question space: {self.num_questions} "
                f"questions ({self.grid_size} x {self.grid_size} board, {self.min_hops} to {self.max_hops} arrows) x "
                f"`{split}_share`={self.share(split)} is about {available:.0f}. Ask for at most "
                f"{int(0.9 * available)}, raise `{split}_share`, or use a larger board or more arrows."
            )

    def check_split_sizes(self) -> None:
        """[`check_split_fits`] for every split, before any is drawn (the test split is drawn after training)."""
        for split in SPLITS:
            self.check_split_fits(split)

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        return getattr(self, f"{split}_size")

    def share(self, split: str) -> float:
        """The share of all questions that belongs to `split`."""
        if split == "train":
            return 1.0 - self.validation_share - self.test_share
        return getattr(self, f"{split}_share")

    @property
    def folder_name(self) -> str:
        """The folder of this task's images under a rendering directory: every setting that changes a board or its
        image is in the name (split sizes are not: the first n records of a split do not depend on its size)."""
        name = (
            f"{self.variant}_{self.grid_size}x{self.grid_size}_{self.min_hops}-{self.max_hops}hops_"
            f"{self.image_size}px_seed{self.seed}"
        )
        if (self.validation_share, self.test_share) != (0.1, 0.3):
            name += f"_shares{self.validation_share:g}-{self.test_share:g}"
        return name

    @property
    def num_questions(self) -> int:
        """Distinct questions: boards x start cells x hop counts (x ordered pairs of cells, at most, if branching).

        For the dot variant an upper bound: for each number of arrows n, start cells x paths of n arrows through
        distinct cells (at most 4 x 3**(n - 1) arrow sequences: no arrow points back) x boards with those n arrows
        fixed x pairs of decoy dots off the path."""
        cells = self.grid_size**2
        hops = self.max_hops - self.min_hops + 1
        if self.variant == "branching":
            return len(ARROW_PAIRS) ** cells * cells * hops * cells * (cells - 1)
        if self.variant == "dot":
            return sum(
                cells * 4 * 3 ** (n - 1) * len(DIRECTIONS) ** (cells - n) * math.comb(cells - n - 1, NUM_DOTS - 1)
                for n in range(self.min_hops, self.max_hops + 1)
            )
        return len(DIRECTIONS) ** cells * cells * hops


@dataclass(frozen=True)
class Puzzle:
    """One arrow-chase instance: `board[row][column]` is a direction (a pair of them if branching); `path` lists the
    visited cells; `targets` are the two cells a branching question offers (the answer is the path's end); `dots` are
    the dotted cells of a dot question, in row-major order (the answer, the path's end, is one of them)."""

    board: tuple
    start: tuple[int, int]
    path: tuple[tuple[int, int], ...]
    targets: tuple[tuple[int, int], ...] = ()
    dots: tuple[tuple[int, int], ...] = ()

    @property
    def hops(self) -> int:
        return len(self.path) - 1

    @property
    def question(self) -> tuple:
        """What the model is asked: the board (the image), the start cell, the number of arrows (and the targets), or
        for a dot question the board, the start cell and the dots (the number of arrows follows from them)."""
        if self.dots:
            return (self.board, self.start, self.dots)
        return (self.board, self.start, self.hops, *self.targets)


def cell_name(cell: tuple[int, int]) -> str:
    row, column = cell
    return f"{COLUMN_LETTERS[column]}{row + 1}"


def step(cell: tuple[int, int], direction: str, size: int) -> tuple[int, int]:
    """The cell one arrow away, wrapping around the edges."""
    d_row, d_column = DIRECTIONS[direction]
    return ((cell[0] + d_row) % size, (cell[1] + d_column) % size)


def follow(board, start: tuple[int, int], hops: int) -> tuple[tuple[int, int], ...]:
    """The cells visited from `start` following `hops` arrows (one per cell), wrapping around the edges."""
    path = [start]
    for _ in range(hops):
        row, column = path[-1]
        path.append(step((row, column), board[row][column], len(board)))
    return tuple(path)


def branching_path(board, start: tuple[int, int], hops: int, target: tuple[int, int]):
    """The first path (arrows tried in each cell's order) of exactly `hops` arrows from `start` to `target`, or None."""
    if hops == 0:
        return (start,) if start == target else None
    for direction in board[start[0]][start[1]]:
        rest = branching_path(board, step(start, direction, len(board)), hops - 1, target)
        if rest is not None:
            return (start, *rest)
    return None


def reachable(board, start: tuple[int, int], hops: int) -> set[tuple[int, int]]:
    """The cells at the end of some path of exactly `hops` arrows from `start` (either arrow of each cell)."""
    frontier = {start}
    for _ in range(hops):
        frontier = {step(cell, direction, len(board)) for cell in frontier for direction in board[cell[0]][cell[1]]}
    return frontier


def _draw_puzzle(rng: random.Random, config: SyntheticTaskConfig) -> Puzzle | None:
    """One random puzzle of `config.variant`; None when a branching draw has no cell out of reach."""
    if config.variant == "dot":
        return _draw_dot_puzzle(rng, config)
    size, names = config.grid_size, list(DIRECTIONS)
    if config.variant == "chase":
        board = tuple(tuple(rng.choice(names) for _ in range(size)) for _ in range(size))
    else:
        board = tuple(tuple(rng.choice(ARROW_PAIRS) for _ in range(size)) for _ in range(size))
    start = (rng.randrange(size), rng.randrange(size))
    hops = rng.randint(config.min_hops, config.max_hops)
    if config.variant == "chase":
        return Puzzle(board, start, follow(board, start, hops))
    ends = reachable(board, start, hops)
    elsewhere = [(row, column) for row in range(size) for column in range(size) if (row, column) not in ends]
    if not elsewhere:
        return None
    target, decoy = rng.choice(sorted(ends)), rng.choice(elsewhere)
    targets = (target, decoy) if rng.random() < 0.5 else (decoy, target)
    return Puzzle(board, start, branching_path(board, start, hops, target), targets)


def _draw_dot_puzzle(rng: random.Random, config: SyntheticTaskConfig) -> Puzzle:
    """A dot puzzle: n arrows (uniform in [min_hops, max_hops]) through n + 1 distinct cells, so the dot at the
    path's end is first reached at arrow n, and two decoy dots off the path."""
    size, names = config.grid_size, list(DIRECTIONS)
    hops = rng.randint(config.min_hops, config.max_hops)
    # Redrawing board and start keeps the hop count uniform, and each path through distinct cells equally likely.
    for _ in range(MAX_DOT_BOARD_DRAWS):
        board = tuple(tuple(rng.choice(names) for _ in range(size)) for _ in range(size))
        start = (rng.randrange(size), rng.randrange(size))
        path = follow(board, start, hops)
        if len(set(path)) == hops + 1:
            break
    else:
        raise ValueError(
            f"No path of {hops} arrows through {hops + 1} distinct cells in {MAX_DOT_BOARD_DRAWS} random "
            f"{size} x {size} boards (dot variant): lower `max_hops`={config.max_hops} or use a larger board."
        )
    off_path = [(row, column) for row in range(size) for column in range(size) if (row, column) not in path]
    decoys = rng.sample(off_path, NUM_DOTS - 1)
    return Puzzle(board, start, path, dots=tuple(sorted([path[-1], *decoys])))


def question_split(puzzle: Puzzle, config: SyntheticTaskConfig) -> str:
    """The split a question belongs to: a fixed hash of the question alone, the same for every seed and split size."""
    key = repr(puzzle.question).encode()
    fraction = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    if fraction < config.test_share:
        return "test"
    if fraction < config.test_share + config.validation_share:
        return "validation"
    return "train"


def generate_puzzles(split: str, config: SyntheticTaskConfig, num_records: int | None = None) -> list[Puzzle]:
    """The puzzles of `split`: deterministic for a given `config.seed`, different for each split.

    Only questions of `split`'s part of the question space are kept ([`question_split`]), so no question is in two
    splits; validation and test questions are also distinct within their split. The first `n` puzzles do not depend
    on how many are asked for.
    """
    num_records = config.split_size(split) if num_records is None else num_records
    config.check_split_fits(split, num_records)
    rng = random.Random(f"arrow-chase-{config.seed}-{split}")
    puzzles, seen = [], set()
    max_draws = 10_000 + int(50 * num_records / config.share(split))
    for _ in range(max_draws):
        if len(puzzles) == num_records:
            break
        puzzle = _draw_puzzle(rng, config)
        if puzzle is None or question_split(puzzle, config) != split or (split != "train" and puzzle.question in seen):
            continue
        seen.add(puzzle.question)
        puzzles.append(puzzle)
    if len(puzzles) < num_records:
        raise ValueError(
            f"Found only {len(puzzles)} distinct {split} questions in {max_draws} draws, {num_records} asked for: the "
            f"{split} share of the {config.num_questions} questions is too small. Ask for fewer or raise `{split}_share`."
        )
    return puzzles


def render_board(board, image_size: int, dots=()) -> Image.Image:
    """The board as an RGB image: each cell filled with its direction's colour, with a dark arrow head on it; a cell
    with two arrows (branching variant) has the first one's colour and arrow in its top half, the second's below. The
    cells in `dots` (dot variant) get a white dot with a dark outline in their top-left corner, clear of the arrow."""
    size = len(board)
    cell = image_size // size
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for row in range(size):
        for column in range(size):
            left, top = column * cell, row * cell
            arrows = board[row][column]
            if isinstance(arrows, str):
                draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=COLOURS[arrows])
                draw.polygon(_arrow_head(arrows, left, top, cell), fill=(30, 30, 30))
                continue
            half = cell // 2
            for index, direction in enumerate(arrows):
                y = top + index * half
                draw.rectangle((left, y, left + cell - 1, y + half - 1), fill=COLOURS[direction])
                # The arrow head of a half cell: the full cell's, scaled to half the height.
                head = [(x, y + (v - top) / 2) for x, v in _arrow_head(direction, left, top, cell)]
                draw.polygon(head, fill=(30, 30, 30))
    for row, column in dots:
        draw.ellipse(_dot_box(column * cell, row * cell, cell), fill=(255, 255, 255), outline=(30, 30, 30))
    return image


def puzzle_record(puzzle: Puzzle, record_id: str, image_path: str) -> dict:
    """The record of a puzzle: question, one step per hop, the final cell (a dotted one if dot) as answer, the board
    image."""
    steps = []
    size = len(puzzle.board)
    for here, there in zip(puzzle.path[:-1], puzzle.path[1:], strict=True):
        arrows = puzzle.board[here[0]][here[1]]
        direction = next(d for d in ([arrows] if isinstance(arrows, str) else arrows) if step(here, d, size) == there)
        steps.append(f"{cell_name(here)} points {direction} to {cell_name(there)}.")
    if puzzle.dots:
        question = dot_question_text(puzzle.start)
    else:
        question = question_text(puzzle.start, puzzle.hops, puzzle.targets)
    return {
        "id": record_id,
        "question": question,
        "steps": steps,
        "answer": cell_name(puzzle.path[-1]),
        "images": [image_path],
    }


def question_text(start: tuple[int, int], hops: int, targets=()) -> str:
    """The question: `Start at B3 and follow 4 arrows. Where do you stop?`, or with targets `... Which can you reach,
    A1 or C2?`."""
    arrows = "arrow" if hops == 1 else "arrows"
    text = f"Start at {cell_name(start)} and follow {hops} {arrows}."
    if targets:
        return f"{text} Which can you reach, {cell_name(targets[0])} or {cell_name(targets[1])}?"
    return f"{text} Where do you stop?"


def dot_question_text(start: tuple[int, int]) -> str:
    """The dot variant's question, without a number of arrows: `Start at B3 and follow the arrows until you reach a
    cell with a dot. Where do you stop?`."""
    return f"Start at {cell_name(start)} and follow the arrows until you reach a cell with a dot. Where do you stop?"


def build_synthetic_split(
    output_dir: str | Path, split: str, config: SyntheticTaskConfig | None = None, num_records: int | None = None
) -> Dataset:
    """Render `split` into `output_dir/<config.folder_name>/<split>/` (a PNG per record) and return its records.

    Runs with different task settings (a seed sweep, another board) may share `output_dir`: each task renders into
    its own folder, so no run rewrites another's images (records read them lazily, when a batch is built). Runs with
    the same settings write the same bytes, each file through a temporary file renamed into place, so a reader never
    sees a half-written one.

    Args:
        output_dir (`str` or `Path`): where images go, e.g. `outputs/data/arrow_chase`; created if needed.
        split (`str`): `"train"`, `"validation"` or `"test"`.
        config ([`SyntheticTaskConfig`], *optional*): task settings (defaults when left out).
        num_records (`int`, *optional*): the first `num_records` puzzles of the split instead of its configured size
            (the same puzzles as the full split's first ones).
    """
    config = config or SyntheticTaskConfig()
    folder = Path(output_dir) / config.folder_name / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, puzzle in enumerate(generate_puzzles(split, config, num_records)):
        record_id = f"{split}-{index:05d}"
        path = folder / f"{record_id}.png"
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{record_id}-", suffix=".png", delete=False) as file:
            render_board(puzzle.board, config.image_size, puzzle.dots).save(file, format="PNG")
        os.replace(file.name, path)
        records.append(puzzle_record(puzzle, record_id, str(path)))
    # Images were just written; checking them again would only re-read them.
    return validate_dataset(records_to_dataset(records), check_images=False)


def synthetic_corpus(config: SyntheticTaskConfig | None = None) -> list[str]:
    """Every word the task can produce, in its templates, to train the task's tokenizer on."""
    config = config or SyntheticTaskConfig()
    texts = ["user\n", "assistant\n", "### ", "<image>\n"]
    cells = [(row, column) for row in range(config.grid_size) for column in range(config.grid_size)]
    for hops in range(config.min_hops, config.max_hops + 1):
        if config.variant == "branching":
            texts += [question_text(cell, hops, (cell, other)) for cell in cells for other in cells]
        elif config.variant == "chase":
            texts += [question_text(cell, hops) for cell in cells]
    if config.variant == "dot":  # the question has no number of arrows
        texts += [dot_question_text(cell) for cell in cells]
    for cell in cells:
        for direction in DIRECTIONS:
            texts.append(f"{cell_name(cell)} points {direction} to {cell_name(cell)}.\n")
        texts.append(f"### {cell_name(cell)}")
    return texts


def synthetic_tokenizer(config: SyntheticTaskConfig | None = None, vocab_size: int = 384):
    """A small byte-level BPE tokenizer for the task, trained offline on [`synthetic_corpus`] (under a second)."""
    return train_tokenizer(synthetic_corpus(config), vocab_size=vocab_size)


def majority_baseline(train: Dataset, test: Dataset) -> float:
    """Exact-match accuracy on `test` of always answering the most frequent `train` answer (no learning, no image)."""
    majority, _ = Counter(train["answer"]).most_common(1)[0]
    return sum(answer == majority for answer in test["answer"]) / len(test)


def _arrow_head(direction: str, left: int, top: int, cell: int) -> list[tuple[float, float]]:
    # A triangle in the middle of the cell, its tip towards the direction.
    margin, middle = cell * 0.25, cell / 2
    near, far = margin, cell - 1 - margin
    shapes = {
        "right": [(near, near), (far, middle), (near, far)],
        "left": [(far, near), (near, middle), (far, far)],
        "down": [(near, near), (middle, far), (far, near)],
        "up": [(near, far), (middle, near), (far, far)],
    }
    return [(left + x, top + y) for x, y in shapes[direction]]


def _dot_box(left: int, top: int, cell: int) -> tuple[float, float, float, float]:
    # A circle in the top-left corner, its centre 0.15 cell from the edges and radius 0.12 cell: it stays clear of the
    # arrow head, which starts 0.25 cell in (7 px diameter, 5 px white inside, on a 28 px cell).
    centre, radius = cell * 0.15, cell * 0.12
    return (left + centre - radius, top + centre - radius, left + centre + radius, top + centre + radius)


__all__ = [
    "ARROW_PAIRS",
    "COLOURS",
    "DIRECTIONS",
    "NUM_DOTS",
    "SPLITS",
    "VARIANTS",
    "Puzzle",
    "SyntheticTaskConfig",
    "branching_path",
    "build_synthetic_split",
    "cell_name",
    "dot_question_text",
    "follow",
    "generate_puzzles",
    "majority_baseline",
    "puzzle_record",
    "question_split",
    "question_text",
    "reachable",
    "render_board",
    "step",
    "synthetic_corpus",
    "synthetic_tokenizer",
]
