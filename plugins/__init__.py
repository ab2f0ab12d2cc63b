"""qpm's built-in plugins (installed as ``qpm_plugins``), registered through the ``qpm`` entry-point group."""
