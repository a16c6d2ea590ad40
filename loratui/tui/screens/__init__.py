"""Screens: the wizard, the training view, and the modals (confirm, help, error)."""
