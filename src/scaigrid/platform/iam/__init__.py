"""Identity and access management (SPEC §1.11): direct grants, custom roles, groups and
role mappings."""
