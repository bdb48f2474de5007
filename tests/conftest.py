"""Test-session set-up shared by every test package."""
from tests.torchvision_ops import prepare_torchvision

# Must run before anything imports torchvision: diffusers and transformers import it whenever it is installed,
# and this machine's registry wheel cannot load its compiled operators (see tests/torchvision_ops.py).
prepare_torchvision()
