"""Root conftest: esa's pytest plugin (options, markers, the claim fixture, reports) is loaded
through its ``pytest11`` entry point, so nothing is registered here."""

collect_ignore = ["fixtures", "reports"]
