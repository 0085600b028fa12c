"""torch.hub entry points: one per registered RIDE model.

    model = torch.hub.load("path/to/ride-models", "ride_resnet32_4e", source="local", pretrained=True)

Each entry point is ``timm.create_model(name, pretrained=..., **kwargs)``; keyword arguments go to timm
(``num_classes``, ``pretrained_cfg_overlay=dict(file=...)``, ...). ``torch.hub.list`` shows the names.
"""

dependencies = ["torch", "timm", "safetensors"]

import timm  # noqa: E402

import ride_models  # noqa: E402, F401  (registers the models)


def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs):
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"timm.create_model({name!r}, pretrained=pretrained, **kwargs)"
    return create


for _name in timm.list_models("ride_*"):
    globals()[_name] = _entry_point(_name)
