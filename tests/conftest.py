"""Suite-wide hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) derandomizes
the search so a CI run is reproducible; local runs keep exploring new examples."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
