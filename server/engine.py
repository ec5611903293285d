"""The engine: one frozen BERT encoder, many LoRA adapters in preallocated slots, one forward pass.

INTERFACE (implementation in progress; signatures are stable):

    engine = Engine(model=None, device=None, dtype="float32", num_slots=16, max_rank=64, max_labels=32)
    engine.base        -> adapters.peft.BaseSpec (shapes, module names, max_length)
    engine.device      -> torch.device
    engine.num_slots   -> int; usable slots are 0 .. num_slots-1
    engine.tokenize(texts: list[str], truncate: bool = True) -> list[list[int]]
        token ids per text ([CLS] ... [SEP]); with truncate=False a text longer than
        base.max_length raises adapters.errors.InvalidInputError naming its index and token count.
    engine.load_slot(slot: int, adapter: AdapterWeights) -> None   # between forward passes only
    engine.clear_slot(slot: int) -> None                           # between forward passes only
    engine.classify(token_ids: list[list[int]], slots: list[int]) -> list[torch.Tensor]
        pads the rows into one batch, runs ONE forward pass where row i uses slot slots[i],
        returns per row the logits over that slot's labels (1-D float32 CPU tensor, len = num_labels).
    engine.warmup() -> None

Not thread-safe: one thread (the batcher's worker) calls classify/load_slot/clear_slot.
"""
