"""The terminal user interface: the `loratui wizard` assistant and the live training view.

Only this package imports Textual. It calls the core (config, GPU, data checks, captioning, memory planner,
run directory) and holds no training or checking logic. Layout:

- `formatting.py`, `chart.py`, `run_model.py`, `wizard_state.py`, `caption_bridge.py`: pure helpers,
  importable without Textual; `testing.py`: synthetic runs and helpers for tests and screenshots.
- `background.py`: long calls from thread workers that are abandoned when the app exits.
- `messages.py`: the messages widgets and workers post (small dataclasses).
- `widgets/`: one widget per file; `steps/`: the wizard steps; `screens/`: screens and modals.
- `styles/*.tcss`: all styling (theme variables only, so light and dark themes both read well).
- `launch.py`: entry points used by the CLI (`run_wizard`, `open_training_view`).
"""
