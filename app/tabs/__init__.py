"""The GUI's tabs, in display order. Each name is a module here exposing `build(ctx)`, which creates its own
`gr.Tab("<Label>")` inside the app's gr.Tabs. Add a tab by adding its module name (Jobs stays last)."""

TABS: list[str] = [
    "models",
    "dataset",
    "cache",
    "train",
    "generate",
    "tools",
    "jobs",
]
