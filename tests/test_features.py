"""Cached encoder features reproduce the full model for linear probing and CLAdapter stage 1."""

import warnings

import pytest
import torch

import medadapt
from medadapt.engine.features import cache_features, head_forward, output_adapter

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


@pytest.mark.parametrize("method,options", [("linear", {}), ("cladapter", {"bottleneck": 8, "num_clusters": 3})])
def test_cached_features_give_the_models_output_and_gradients(method, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = medadapt.create_model("classification", backbone="timm:convnext_atto", backbone_options=TINY,
                                      num_classes=3, method=method, method_options=options)
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 1])
    model.eval()
    adapter = output_adapter(model)
    (features, target), = cache_features(model, [(x, y)])
    torch.testing.assert_close(head_forward(model, features, adapter), model(x), rtol=1e-5, atol=1e-6)
    loss = torch.nn.functional.cross_entropy(head_forward(model, features, adapter), target)
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_methods_that_change_the_encoder_cannot_cache():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = medadapt.create_model("classification", backbone="timm:convnext_atto", backbone_options=TINY,
                                      num_classes=3, method="dka")
    with pytest.raises(ValueError, match="frozen encoder"):
        output_adapter(model)


def test_caching_asks_the_methods_config_whether_the_encoder_output_is_fixed(monkeypatch):
    """A method registered under any name caches features when its config says its encoder's
    output cannot change at the model's stage (and only then), with no list of method names."""
    import dataclasses

    from medadapt.adapters import METHODS
    from medadapt.adapters.cladapter import CLAdapterConfig
    from medadapt.adapters.finetune import LinearProbeConfig

    @dataclasses.dataclass
    class ProbeConfig(LinearProbeConfig):
        pass

    @dataclasses.dataclass
    class ClusterConfig(CLAdapterConfig):
        pass

    monkeypatch.setitem(METHODS, "probe", ProbeConfig)
    monkeypatch.setitem(METHODS, "cluster", ClusterConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = medadapt.create_model("classification", backbone="timm:convnext_atto", backbone_options=TINY,
                                      num_classes=3, method="probe")
        cluster = medadapt.create_model("classification", backbone="timm:convnext_atto", backbone_options=TINY,
                                        num_classes=3, method="cluster", method_options={"bottleneck": 8, "num_clusters": 3})
    assert output_adapter(probe) is None
    assert output_adapter(cluster) is not None
    medadapt.set_stage(cluster, 2)   # stage 2 trains the encoder: its features change
    with pytest.raises(ValueError, match="frozen encoder"):
        output_adapter(cluster)
