"""ride-models: RIDE (Routing Diverse Distribution-Aware Experts, ICLR 2021) for timm.

Importing this package registers every ``ride_*`` model with timm::

    import timm, ride_models
    model = timm.create_model("ride_resnet32_4e")
"""

from ride_models.models import RIDEOutput, RIDEResNet, RoutedOutput, RouterTrainOutput  # noqa: F401  (registers)

__version__ = "0.1.0.dev0"
