"""Convert an InternVL checkpoint into a Hub-ready Coconut-InternVL repository folder, and optionally push it.

```bash
# transformers-native InternVL (the `-hf` repositories), or a local folder in either layout
python convert_to_coconut.py --base OpenGVLab/InternVL3-1B-hf --output outputs/coconut-internvl3-1b

# OpenGVLab's original remote-code layout (read as data: its code is never run)
python convert_to_coconut.py --base OpenGVLab/InternVL3-1B --output outputs/coconut-internvl3-1b

# an original checkpoint without a `-hf` version, then upload
python convert_to_coconut.py --base OpenGVLab/InternVL3-1B-Pretrained --output outputs/coconut-internvl3-1b-pt \
    --push_to_hub your-name/coconut-internvl3-1b-pt
```

Wrong inputs are refused before any weight is downloaded: a checkpoint that is not InternVL, a folder without
`config.json`, an `--output` inside `--base` (see docs/conversion.md).

The folder then loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser
from transformers.utils import logging

from coconut.convert import (
    add_latent_tokens,
    build_generation_config,
    check_output_folder,
    load_base,
    read_base_config,
)
from coconut.model_card import build_model_card, model_license
from coconut.preflight import check_writable
from coconut.repository import push_folder, save_repository
from processing_coconut_internvl import DEFAULT_CHAT_TEMPLATE, CoconutInternVLProcessor, thought_count


logger = logging.get_logger(__name__)


@dataclass
class ConvertConfig:
    base: str = field(
        metadata={"help": "InternVL checkpoint: a Hub id or a local folder (native `-hf` or original layout)."}
    )
    output: str = field(metadata={"help": "Folder to write the Coconut-InternVL repository to."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repository id to upload the folder to (created if needed)."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model for the model card; defaults to `--base` (required with "
            "`--push_to_hub` when `--base` is a local folder)."
        },
    )
    license: str | None = field(
        default=None,
        metadata={"help": "Licence for the model card; defaults to the `license` in the base model's README.md."},
    )
    datasets: list[str] = field(default_factory=list, metadata={"help": "Datasets to list in the model card."})
    num_latent_thoughts: int = field(
        default=0, metadata={"help": "Thoughts the model card's quick start asks for (its trained setting)."}
    )

    def __post_init__(self):
        check_output_folder(self.base, self.output)
        thought_count(self.num_latent_thoughts)  # before the base is downloaded and loaded, not after
        if self.private and not self.push_to_hub:
            raise ValueError(
                "`--private` without `--push_to_hub`: no Hub repository is created, so it would be ignored. Add "
                "`--push_to_hub you/name`, or drop it."
            )
        if self.push_to_hub and self.base_model_id is None and Path(self.base).is_dir():
            raise ValueError(
                f"`--base` {self.base} is a local folder, so the model card cannot name the base model on the Hub: "
                "pass `--base_model_id OWNER/NAME`."
            )


def main(config: ConvertConfig) -> None:
    logging.set_verbosity_info()
    read_base_config(config.base)  # refuses a checkpoint that is not InternVL before its weights are downloaded
    check_writable(config.output, "output")  # a file, or a folder that cannot be written, before any loading
    license = config.license or model_license(config.base)
    model, tokenizer, image_processor, video_processor = load_base(config.base)
    start, end, latent = add_latent_tokens(model, tokenizer)
    logger.info(f"Added <|start-latent|>={start}, <|end-latent|>={end}, <|latent|>={latent}")
    model.generation_config = build_generation_config(model, tokenizer)
    # One chat format for every base checkpoint: images render as `<image>`, as Coconut's prompts are built.
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    video = {"video_processor": video_processor} if video_processor is not None else {}
    processor = CoconutInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=model.config.image_seq_length,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        **video,
    )
    card = build_model_card(
        repo_id=config.push_to_hub or config.output,
        base_model=config.base_model_id or config.base,
        license=license,
        datasets=config.datasets,
        num_latent_thoughts=config.num_latent_thoughts,
    )
    folder = save_repository(model, processor, config.output, card)
    logger.info(f"Saved the Coconut-InternVL repository to {folder}")
    if config.push_to_hub:
        url = push_folder(folder, config.push_to_hub, private=config.private)
        logger.info(f"Pushed to {url}")


if __name__ == "__main__":
    (convert_config,) = HfArgumentParser(ConvertConfig).parse_args_into_dataclasses()
    main(convert_config)
