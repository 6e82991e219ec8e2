"""sphere-edit: sequential knowledge editing with the SPHERE projection.

from sphere_edit import load_model, build_session, EditRequest
loaded = load_model("smollm2-135m")
session = build_session(loaded, "alphaedit+sphere")
session.apply([EditRequest.create("{} plays the", "Jimi Hendrix", "violin", "guitar")])
"""

from .editing.build import MethodSpec, build_session
from .editing.requests import EditRequest, RequestError, load_requests
from .editing.session import BatchResult, EditSession
from .editing.vstar import VStarConfig
from .methods import (
    FT,
    MEMIT,
    PRUNE,
    RECT,
    ROME,
    AlphaEdit,
    EditMethod,
    GradientMethod,
    LayerState,
    make_method,
)
from .model.arch import ARCHITECTURES, ArchSpec, ModelLayout, register_architecture
from .model.loading import LoadedModel, load_model
from .sphere.energy import hyperspherical_energy
from .sphere.projection import SphereProjection

__all__ = [
    "ARCHITECTURES",
    "AlphaEdit",
    "ArchSpec",
    "BatchResult",
    "EditMethod",
    "EditRequest",
    "EditSession",
    "FT",
    "GradientMethod",
    "LayerState",
    "LoadedModel",
    "MEMIT",
    "MethodSpec",
    "ModelLayout",
    "PRUNE",
    "RECT",
    "ROME",
    "RequestError",
    "SphereProjection",
    "VStarConfig",
    "build_session",
    "hyperspherical_energy",
    "load_model",
    "load_requests",
    "make_method",
    "register_architecture",
]
__version__ = "0.1.0"
