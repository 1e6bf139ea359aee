"""Learner batches: image pads expanded exactly as the HF processor expands them."""
import numpy as np
import pytest
import torch

from policies.batching import TrainSample, collate, expand_image_pads, token_logprobs


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def sample(tokenizer, text, images, advantage=1.0):
    ids = tokenizer.encode(text, add_special_tokens=False)
    mask = [0] * 3 + [1] * (len(ids) - 3)
    return TrainSample(ids, mask, [-0.25 * m for m in mask], images, advantage)


def test_expansion_matches_the_hf_processor(processor):
    tokenizer = processor.tokenizer
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    images = [np.zeros((224, 280, 3), np.uint8), np.zeros((112, 112, 3), np.uint8)]
    batch = collate([sample(tokenizer, text, images)], processor.image_processor,
                    tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokenizer.pad_token_id)
    from PIL import Image

    reference = processor(text=[text], images=[Image.fromarray(i) for i in images], return_tensors="pt")
    assert torch.equal(batch.inputs["input_ids"], reference["input_ids"])
    assert torch.equal(batch.inputs["image_grid_thw"], reference["image_grid_thw"])
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Image tokens are typed as the processor types them: without these types transformers gives
    # the sequence 1-D positions, not the 3-D M-RoPE positions vLLM uses (learner != engine).
    assert batch.inputs["mm_token_type_ids"].sum() == (batch.inputs["input_ids"] == pad).sum() == 16 * 5 + 4 * 4
    if "mm_token_type_ids" in reference:
        assert torch.equal(batch.inputs["mm_token_type_ids"].long(), reference["mm_token_type_ids"].long())
    assert (batch.loss_mask[0][batch.targets[0] == pad] == 0).all()


def test_padding_masks_and_advantages(processor):
    tokenizer = processor.tokenizer
    short = sample(tokenizer, "<|im_start|>assistant\nred<|im_end|>", [], advantage=0.5)
    long = sample(tokenizer, "<|im_start|>assistant\nthe colour is red, I think<|im_end|>", [], advantage=-0.5)
    batch = collate([short, long], processor.image_processor, tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                    tokenizer.pad_token_id)
    assert batch.inputs["attention_mask"][0].sum() == len(short.token_ids)
    assert batch.loss_mask[0].sum() == sum(short.loss_mask[1:])
    assert batch.advantages[0, 0] == 0.5 and batch.advantages[1, 0] == -0.5
    assert "pixel_values" not in batch.inputs


def test_train_sample_takes_lists_or_arrays_and_rejects_ragged_columns(processor):
    ids = [5, 6, 7, 8]
    as_lists = TrainSample(ids, [0, 1, 1, 0], [0.0, -0.5, -0.25, 0.0], [], 0.25)
    as_arrays = TrainSample(np.asarray(ids), np.asarray([0, 1, 1, 0], np.int8),
                            np.asarray([0.0, -0.5, -0.25, 0.0], np.float32), [], 0.25)
    assert as_lists.num_trained_tokens == as_arrays.num_trained_tokens == 2
    pad, eos = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"), processor.tokenizer.pad_token_id
    one, other = (collate([s], processor.image_processor, pad, eos) for s in (as_lists, as_arrays))
    assert torch.equal(one.inputs["input_ids"], other.inputs["input_ids"])
    assert torch.equal(one.loss_mask, other.loss_mask) and torch.equal(one.old_logprobs, other.old_logprobs)
    with pytest.raises(ValueError, match="loss_mask"):
        TrainSample([1, 2, 3], [0, 1], [0.0, 0.0, 0.0], [], 0.0)


def test_pad_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="images"):
        expand_image_pads(TrainSample([7, 9], [0, 1], [0, -1], [], 0.0), image_pad_id=7, tokens_per_image=[])


def test_token_logprobs_picks_the_next_token():
    logits = torch.log(torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]]]))
    targets = torch.tensor([[1, 0]])
    assert torch.allclose(token_logprobs(logits, targets), torch.log(torch.tensor([[0.9, 0.8]])))


def test_mini_batches_split_a_step_across_prompt_groups():
    from policies.batching import mini_batches

    samples = [f"p{prompt}-s{sample}" for prompt in range(3) for sample in range(4)]  # grouped by prompt
    batches = mini_batches(samples, 4)
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert sorted(s for b in batches for s in b) == sorted(samples)  # each sample exactly once
    assert all({s[:2] for s in b} == {"p0", "p1", "p2"} for b in batches)  # every prompt in every batch
    assert mini_batches(samples[:3], 4) == [["p0-s0"], ["p0-s1"], ["p0-s2"]]  # never an empty batch
    assert mini_batches(samples, 1) == [samples]


def test_a_fixed_mini_batch_makes_fewer_optimizer_steps_when_fewer_samples_were_kept():
    from policies.batching import mini_batch_count

    assert mini_batch_count(24, 64, 4, fixed_mini_batch=False) == 4  # four steps of 6 samples
    assert mini_batch_count(24, 64, 4, fixed_mini_batch=True) == 2  # 24 samples are 2 shares of 16 (rounded up): 2 steps of 12
    assert mini_batch_count(64, 64, 4, fixed_mini_batch=True) == 4  # a full step: as before
    assert mini_batch_count(3, 64, 4, fixed_mini_batch=True) == 1
    assert mini_batch_count(80, 64, 4, fixed_mini_batch=True) == 4  # replayed extras: never more steps
    assert mini_batch_count(5, 4, 1, fixed_mini_batch=True) == 1


def test_gradient_accumulation_covers_each_update_s_share_of_the_step():
    from cluster.config import TrainerConfig

    trainer = TrainerConfig(num_learners=2, micro_batch_size=4, updates_per_step=4)
    assert trainer.gradient_accumulation_steps(64) == 8  # 32 per rank / 4
    assert trainer.gradient_accumulation_steps(64, updates_per_step=4) == 2  # one of four mini-batches: 8 per rank
    assert trainer.gradient_accumulation_steps(1) == 1
