"""Shared fixtures: tiny random-weight models of every supported architecture, saved as HF directories."""
from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 30528   # the built-in MiniLM tokenizer (30522) plus room for special tokens some tokenizer classes add
SMALL = dict(vocab_size=VOCAB)

TINY = {
    "bert": lambda: (transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=96, max_position_embeddings=128, **SMALL),
                     transformers.BertModel),
    "gpt2": lambda: (transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, **SMALL),
                     transformers.GPT2LMHeadModel),
    "llama": lambda: (transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=96,
                                               max_position_embeddings=128, **SMALL),
                      transformers.LlamaForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=96,
                                               max_position_embeddings=128, **SMALL),
                      transformers.Qwen2ForCausalLM),
    "opt": lambda: (transformers.OPTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                                           word_embed_proj_dim=48, max_position_embeddings=128, **SMALL),
                    transformers.OPTForCausalLM),
    "gemma3": lambda: (transformers.Gemma3TextConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=1, head_dim=16, intermediate_size=96,
                                                     max_position_embeddings=128, sliding_window=16, **SMALL),
                       transformers.Gemma3ForCausalLM),
}
ARCHS = list(TINY)


def tiny_model(arch: str, seed: int = 0):
    config, cls = TINY[arch]()
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from layerzip.io import builtin_path
    return transformers.AutoTokenizer.from_pretrained(builtin_path("minilm"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{arch: path} of tiny models saved with save_pretrained + the MiniLM tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """Real English text (standard-library docstrings) as a .txt calibration file."""
    from layerzip.data import builtin_documents
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text("\n".join(builtin_documents("calib", limit=40)))
    return p


def run_cli(capsys, *argv):
    """`layerzip ARGV` in this process: (exit code, stdout, stderr)."""
    from layerzip.cli import main
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    cap = capsys.readouterr()
    return e.value.code or 0, cap.out, cap.err
