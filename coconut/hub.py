"""Local path or Hub repository id: the one place that decides, before anything is looked up on the Hub."""

from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id


# Suffixes of the files a model or dataset name can point to: a name ending in one is a path, not a repository id.
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".safetensors")


def is_local_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub repository id (`name` or `namespace/name`), decided
    without a Hub look-up, so that a typo in a path is "no such folder", not a failed download.

    A path is a name that exists; one that `huggingface_hub`'s own `validate_repo_id` refuses as an id (`./name`,
    `/abs/name`, `~/name`, `a/b/c`); a file name with a data or weight suffix ([`FILE_SUFFIXES`]); or
    `folder/name` whose `folder` exists here (`data/prosqa` beside a `data/` folder, `outputs/demoo`).
    """
    path = Path(name).expanduser()
    if path.exists() or path.suffix in FILE_SUFFIXES:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    namespace = Path(name).parent
    return namespace != Path(".") and namespace.is_dir()


__all__ = ["FILE_SUFFIXES", "is_local_path"]
