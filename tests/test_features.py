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


def _tiny(method, options=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medadapt.create_model("classification", backbone="timm:convnext_atto", backbone_options=TINY,
                                     num_classes=3, method=method, method_options=options or {})


class CountingInferer:
    """SimpleInferer that counts the samples it ran through the whole network."""

    def __init__(self):
        self.samples = 0

    def __call__(self, inputs, network):
        self.samples += len(inputs)
        return network(inputs)


@pytest.mark.parametrize("method,options", [("linear", {}), ("cladapter", {"bottleneck": 8, "num_clusters": 3})])
def test_the_training_inferer_reuses_features_of_repeated_inputs(method, options):
    from medadapt.engine.features import FeatureCacheInferer

    model = _tiny(method, options)
    model.eval()  # compare with the plain forward without dropout
    inner = CountingInferer()
    inferer = FeatureCacheInferer(inner)
    x = torch.rand(4, 3, 64, 64)
    calls = []
    real = model.features
    model.features = lambda inputs: calls.append(len(inputs)) or real(inputs)  # a spy on one instance
    first = inferer(x, model)
    inferer.epoch_completed()
    second = inferer(x[[2, 0]], model)  # the same samples, another batch
    assert calls == [4] and inner.samples == 0  # encoded once, the second batch from memory
    del model.features
    torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, model(x[[2, 0]]), rtol=1e-5, atol=1e-6)
    second.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_the_cache_stays_out_of_the_way_where_it_cannot_help():
    from medadapt.engine.features import FeatureCacheInferer

    # A method whose training changes the encoder: every batch through the network.
    dka = _tiny("dka")
    inner = CountingInferer()
    inferer = FeatureCacheInferer(inner)
    inferer(torch.rand(2, 3, 64, 64), dka)
    assert inner.samples == 2 and not inferer.cache
    # Inputs that never repeat (random augmentation): off after the second epoch, memory freed.
    linear = _tiny("linear")
    inferer = FeatureCacheInferer(CountingInferer())
    for _ in range(2):
        inferer(torch.rand(2, 3, 64, 64), linear)
        inferer.epoch_completed()
    assert not inferer.enabled and not inferer.cache and inferer.bytes == 0
    with pytest.raises(ValueError, match="feature_cache"):
        FeatureCacheInferer(CountingInferer(), enabled="always")
