"""Ray connection, resources and actor pools."""
