"""Gradient checkpointing with continuous thoughts: the same loss and gradients, fewer activations kept."""

import torch
from conftest import Row, build_batch, model_inputs, tiny_model


def loss_grads_and_saved_bytes(model, batch):
    """Loss, every parameter's gradient, and the bytes of the tensors autograd keeps for the backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_checkpointing_gives_the_same_loss_and_gradients_with_less_memory():
    model = tiny_model(seed=0)
    model.train()
    rows = [Row(latents=3, answer=6), Row(latents=2, lead=2, answer=5), Row(latents=0, answer=4)]
    batch = model_inputs(build_batch(rows, padding_side="right"))

    loss, grads, saved = loss_grads_and_saved_bytes(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.is_activation_checkpointing
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(model, batch)

    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert saved_ckpt < 0.8 * saved, (saved_ckpt, saved)
