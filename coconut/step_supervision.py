"""Step supervision of the continuous thoughts (SIM-CoT, Wei et al. 2025, arXiv 2509.20317).

During training a separate decoder reads the thoughts that replace each reasoning step and must write that step's
text: step `i` (from 0) of a record is replaced by thoughts `i * c .. (i + 1) * c - 1`, and the decoder reads their
vectors as input embeddings, then writes the step and its newline (`"B3 points up to B2.\\n"`). The thought vector of
the `<|latent|>` token at column `p` is the model's final hidden state at column `p - 1`: for Coconut exactly the
vector fed back there, for pause as thought the state computed at the same column, where nothing is fed back (the
control). The step's loss flows through the thoughts into the model, so each thought is pushed to carry its step.

The decoder is a copy of the model's language model and LM head, taken when training starts, as a causal LM of the
model's text config (`Qwen2ForCausalLM` for InternVL3). It embeds the step's tokens with the model's own input
embeddings (the two share them), trains with the model (with LoRA when the model trains with LoRA), and is not part
of the trained model: it is saved beside it, in `thought_decoder/`, for the thought reader (`coconut.thought_reader`).

Memory: a second copy of the language model and LM head (for InternVL3-1B about 0.49 B parameters: 1 GB in bf16, and
with full fine-tuning its gradients and Adam moments, about 8 GB more in fp32), and one decoder pass over
`(steps in the batch, c + step tokens)` positions per training step.
"""

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from coconut.fused_lm_head import token_log_probs


THOUGHT_DECODER_DIR = "thought_decoder"
STEP_LOSS_NORMALIZATIONS = ("step", "token")
# LoRA on the decoder's projections: its module names are the causal LM's (`model.layers.0.self_attn.q_proj`).
DECODER_LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_thought_decoder(model, lora_config=None) -> nn.Module:
    """A copy of `model`'s language model and LM head as a causal LM, on the model's device and dtype.

    Args:
        model ([`CoconutInternVLForConditionalGeneration`]): the model being trained (not yet wrapped by PEFT).
        lora_config ([`~peft.LoraConfig`], *optional*): the run's LoRA config; the decoder then gets LoRA with the
            same rank, alpha and dropout on its attention and MLP projections, and its own weights stay frozen.
    """
    text_config = copy.deepcopy(model.config.text_config)
    text_config.tie_word_embeddings = False  # the decoder's LM head is its own copy, whatever the model ties
    decoder = AutoModelForCausalLM.from_config(text_config)
    decoder.model.load_state_dict(model.model.language_model.state_dict())
    decoder.lm_head.load_state_dict(model.get_output_embeddings().state_dict())
    decoder.to(device=model.device, dtype=model.dtype)
    decoder.model.embed_tokens.requires_grad_(False)  # training embeds with the model's own embeddings
    if lora_config is None:
        return decoder
    from peft import LoraConfig, get_peft_model

    decoder_lora = LoraConfig(
        r=lora_config.r,
        lora_alpha=lora_config.lora_alpha,
        lora_dropout=lora_config.lora_dropout,
        target_modules=DECODER_LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(decoder, decoder_lora)


def step_targets(
    input_ids: torch.LongTensor, latent_token_id: int, replaced: list[list[str]], tokenizer, c_thought: int
):
    """The decoder's batch: which thought vectors each replaced step reads, and the step's tokens.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, T)`): the training batch.
        latent_token_id (`int`): the id of `<|latent|>` (a pause token, for pause as thought).
        replaced (`list[list[str]]`): per row, the steps its thoughts replace, in order ([`replaced_steps`]).

    Returns:
        `dict` with `step_thought_index` `(S, c)` (flat indices into `(B * T)` of the columns whose final hidden
        states are the step's thoughts), `step_input_ids` and `step_attention_mask` `(S, L)` (each step + newline,
        padded on the right), for the `S` replaced steps of the batch; `S` may be 0.
    """
    width = input_ids.shape[1]
    index, texts = [], []
    for row, steps in enumerate(replaced):
        positions = (input_ids[row] == latent_token_id).nonzero().flatten().tolist()
        if len(positions) < len(steps) * c_thought:
            raise ValueError(
                f"Row {row} has {len(positions)} `<|latent|>` tokens for {len(steps)} replaced steps x c_thought "
                f"{c_thought}: the block and the curriculum disagree."
            )
        for step_number, step in enumerate(steps):
            columns = positions[step_number * c_thought : (step_number + 1) * c_thought]
            index.append([row * width + column - 1 for column in columns])
            texts.append(step + "\n")
    if not texts:
        return {
            "step_thought_index": torch.zeros((0, c_thought), dtype=torch.long),
            "step_input_ids": torch.zeros((0, 1), dtype=torch.long),
            "step_attention_mask": torch.zeros((0, 1), dtype=torch.long),
        }
    tokens = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    return {
        "step_thought_index": torch.tensor(index, dtype=torch.long),
        "step_input_ids": tokens["input_ids"],
        "step_attention_mask": tokens["attention_mask"],
    }


def step_supervision_loss(
    decoder: nn.Module,
    input_embeddings: nn.Module,
    hidden_states: torch.Tensor,
    step_thought_index: torch.LongTensor,
    step_input_ids: torch.LongTensor,
    step_attention_mask: torch.Tensor,
    normalization: str = "step",
) -> torch.Tensor | None:
    """The decoder's loss for writing each replaced step from its thoughts; `None` when the batch replaces no step.

    Args:
        hidden_states (`torch.Tensor` of shape `(B, T, H)`): the model's final hidden states (after the final norm).
        step_thought_index, step_input_ids, step_attention_mask: as [`step_targets`] builds them.
        normalization (`str`): `"step"` sums each step's token losses and averages over steps (SIM-CoT's weighting,
            about as many times a per-token mean as a step has tokens); `"token"` averages over every step token.
    """
    if step_thought_index.shape[0] == 0:
        return None
    device = hidden_states.device
    num_thoughts = step_thought_index.shape[1]
    thoughts = hidden_states.reshape(-1, hidden_states.shape[-1])[step_thought_index.to(device)]  # (S, c, H)
    step_input_ids, step_attention_mask = step_input_ids.to(device), step_attention_mask.to(device)
    step_embeds = input_embeddings(step_input_ids).to(thoughts.dtype)  # (S, L, H)
    inputs_embeds = torch.cat([thoughts, step_embeds], dim=1)  # (S, c + L, H)
    attention_mask = torch.cat([step_attention_mask.new_ones(thoughts.shape[:2]), step_attention_mask], dim=1)
    text_model = decoder.get_decoder()
    decoded = text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    predicting = decoded[:, num_thoughts - 1 : -1]  # (S, L, H): the last thought predicts the step's first token
    mask = step_attention_mask.bool()
    log_probs, _, _ = token_log_probs(predicting[mask], decoder.get_output_embeddings(), step_input_ids[mask])
    if normalization == "token":
        return -log_probs.sum() / mask.sum()
    return -log_probs.sum() / step_thought_index.shape[0]


def save_thought_decoder(decoder: nn.Module, input_embeddings: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Save the decoder as a standalone causal LM (`AutoModelForCausalLM.from_pretrained(folder)`): LoRA merged in,
    and the model's current input embeddings as its own."""
    folder = Path(folder)
    decoder = copy.deepcopy(decoder)
    if hasattr(decoder, "merge_and_unload"):
        decoder = decoder.merge_and_unload()
    vocabulary = torch.arange(decoder.model.embed_tokens.weight.shape[0], device=decoder.device)
    with torch.no_grad():
        decoder.model.embed_tokens.weight.copy_(input_embeddings(vocabulary))
    decoder.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def save_decoder_state(decoder: nn.Module, path: str | Path) -> None:
    """The decoder's whole state (LoRA matrices included) as one safetensors file, for a checkpoint."""
    save_file({name: tensor.contiguous() for name, tensor in decoder.state_dict().items()}, str(path))


def load_decoder_state(decoder: nn.Module, path: str | Path) -> None:
    """Load what [`save_decoder_state`] saved into the same decoder layout (a resumed run's fresh copy)."""
    decoder.load_state_dict(load_file(str(path), device=str(next(decoder.parameters()).device)), strict=True)


__all__ = [
    "DECODER_LORA_TARGETS",
    "STEP_LOSS_NORMALIZATIONS",
    "THOUGHT_DECODER_DIR",
    "build_thought_decoder",
    "load_decoder_state",
    "save_decoder_state",
    "save_thought_decoder",
    "step_supervision_loss",
    "step_targets",
]
