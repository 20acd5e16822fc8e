"""Model resolution: the class a config names, or the auto class for its model type."""
import transformers

from layerzip.io import model_class

from layerzip.models import find_blocks


def test_model_class_without_architectures():
    """A config without `architectures` (e.g. one read from a .gguf file) still maps to the right class."""
    assert model_class(transformers.LlamaConfig()) is transformers.AutoModelForCausalLM
    assert model_class(transformers.Gemma3TextConfig()) is transformers.AutoModelForCausalLM
    assert model_class(transformers.BertConfig()) is transformers.AutoModel
    cfg = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    assert model_class(cfg) is transformers.GPT2LMHeadModel


def test_find_blocks_picks_the_repeated_blocks():
    from conftest import tiny_model
    name, blocks = find_blocks(tiny_model("llama"))
    assert name == "model.layers" and len(blocks) == 2
