"""The ``kdforge`` command line. See :mod:`kdforge.cli.main`."""
