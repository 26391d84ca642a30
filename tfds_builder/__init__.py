"""TFDS dataset builders of the project (one folder per dataset, `tfds new` layout)."""
