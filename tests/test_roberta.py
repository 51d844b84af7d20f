"""RoBERTa (minilora/models/roberta.py) against transformers and peft on tiny random configs:
logits with right and left padding (positions count real tokens, past the padding
index), the plain encoder's outputs, one LoRA step against peft's (adapters and the
trained head), an NF4 base that trains."""

import peft
import pytest
import torch
import transformers

import minilora
from minilora import LoraConfig, inject, load_adapter
from minilora.lora.inject import lora_layers
from minilora.models.roberta import position_ids
from minilora.train.loop import make_optimizer

VOCAB, PAD = 128, 1
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              max_position_embeddings=40, pad_token_id=PAD, initializer_range=0.1, num_labels=3,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**CONFIG))
    path = tmp_path_factory.mktemp("roberta")
    hf.save_pretrained(path, safe_serialization=True)
    return path


def hf_model(folder):
    return transformers.RobertaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()


def padded(side, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((10, 7, 4)):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, :10 - length] = 0
    return ids.masked_fill(mask == 0, PAD), mask, torch.tensor([0, 2, 1])


def test_positions_count_real_tokens_past_the_padding_index():
    ids = torch.tensor([[5, 6, 7, PAD], [PAD, PAD, 8, 9]])
    assert position_ids(ids, PAD).tolist() == [[2, 3, 4, 1], [1, 1, 2, 3]]


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_classifier_logits_and_loss_equal_transformers(folder, side):
    ids, mask, labels = padded(side)
    ours = minilora.load_model(folder, task="sequence-classification", dtype="float32").eval()
    got = ours(ids, attention_mask=mask, labels=labels)
    want = hf_model(folder)(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_plain_encoder_equals_transformers_with_its_pooler(tmp_path):
    torch.manual_seed(1)
    hf = transformers.RobertaModel(transformers.RobertaConfig(**CONFIG)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = minilora.load_model(tmp_path, task="embedding", dtype="float32").eval()
    ids, mask, _ = padded("left")
    got, want = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-4, atol=1e-5)


def test_one_lora_step_equals_peft(folder, tmp_path):
    theirs = peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                                   target_modules=["query", "value", "dense"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = minilora.load_model(folder, task="sequence-classification", dtype="float32")
    load_adapter(ours, tmp_path / "adapter", is_trainable=True)
    ids, mask, labels = padded("right")
    theirs.train()
    ours.train()
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = ours(ids, attention_mask=mask, labels=labels).loss
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    their_grads = {n.removeprefix("base_model.model.").replace("lora_A.default", "lora_A").replace(
        "lora_B.default", "lora_B"): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in our_grads) and any(n.startswith("classifier.modules_to_save") for n in our_grads)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nf4_base_trains(folder):
    ours = minilora.load_model(folder, task="sequence-classification", dtype="float32", quantize="nf4",
                               blocksize=64)
    inject(ours, LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert len(lora_layers(ours)) == 4
    ids, mask, labels = padded("right")
    optimizer = make_optimizer(ours, 1e-2, 0.0, torch.device("cpu"))
    ours.train()
    losses = []
    for _ in range(10):
        loss = ours(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_info_lists_roberta_target_names(folder):
    from minilora.cli.info import describe

    text = describe(folder)
    assert "roberta (RobertaModel)" in text
    for name in ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense"):
        assert f"encoder.layer.N.{name} " in text, text
