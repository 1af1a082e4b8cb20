"""The two packaged real models load from their pip packages (no hub) and run a forward pass on the CPU."""

import torch


def test_smollm2_loads_and_answers(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # a real (not random) model: the next token after this prompt is " Paris"
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_minilm_loads_and_embeds(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(
        ["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    # trained weights: the two cat sentences are closer than the unrelated one
    assert similar > unrelated + 0.3
