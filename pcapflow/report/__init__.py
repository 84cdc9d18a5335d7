"""Rendering: terminal tables, charts, the HTML postmortem. Reads an Analysis, never changes it."""
