"""Base-model inspection (light: headers and configs only) and, in submodules, loading."""
