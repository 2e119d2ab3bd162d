"""Platform revisions (branch ``platform``)."""
