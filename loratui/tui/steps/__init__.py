"""The wizard's steps, one per file, in order (see `wizard_state.STEP_NAMES`)."""
