"""Hidden-state and attention terms between causal language models of different widths and depths (issue
12, part 7): the existing taps, adapters and layer maps work on GPT-2 and Llama students and teachers."""

import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hfdistill import DistillationConfig, DistillationTrainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from token_steps import examples  # noqa: E402


def gpt2(seed: int, layers: int, width: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=width, n_layer=layers, n_head=4,
                                      bos_token_id=0, eos_token_id=0))


def llama(seed: int, layers: int, width: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


CASES = {
    "gpt2 hidden_mse (4 layers -> 2, width 32 -> 16)": (gpt2, {"loss": "hidden_mse", "student": "hidden_states",
                                                               "teacher": "hidden_states"}),
    "gpt2 attention_kl": (gpt2, {"loss": "attention_kl", "student": "attentions", "teacher": "attentions"}),
    "gpt2 attention_mse": (gpt2, {"loss": "attention_mse", "student": "attentions", "teacher": "attentions"}),
    "gpt2 embedding_mse": (gpt2, {"loss": "embedding_mse", "student": "hidden_states.0",
                                  "teacher": "hidden_states.0"}),
    "llama hidden_mse": (llama, {"loss": "hidden_mse", "student": "hidden_states", "teacher": "hidden_states"}),
    "llama attention_kl": (llama, {"loss": "attention_kl", "student": "attentions", "teacher": "attentions"}),
    "llama MiniLM value relations": (llama, {"loss": "minilm_value_relation",
                                             "student": "model.layers.1.self_attn.v_proj",
                                             "teacher": "model.layers.3.self_attn.v_proj",
                                             "params": {"num_relation_heads": 4}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_state_and_attention_terms_train_causal_lms(tmp_path, case):
    build, term = CASES[case]
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                              save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1,
                              learning_rate=0.01)
    student, teacher = build(2, 2, 16), build(1, 4, 32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher=teacher, recipe={"terms": [term]}, args=args,
                                  train_dataset=examples())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    name = trainer.model.terms[0].name
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e[f"loss_{name}"])) for e in logged)
    assert any(e[f"loss_{name}"] > 0 for e in logged)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is untouched
