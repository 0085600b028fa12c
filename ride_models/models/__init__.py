"""RIDE model definitions; importing this package registers them with timm."""

from ride_models.models.ride_resnet import (  # noqa: F401
    BasicBlock,
    Bottleneck,
    NormedLinear,
    RIDEOutput,
    RIDEResNet,
    RoutedOutput,
    RouterTrainOutput,
    summarize_state_dict,
)
