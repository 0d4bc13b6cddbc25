"""One module per verb of the `moescope` command line: its arguments (`add_arguments`), its run
(`run`, returning the exit status) and what it prints. Nothing in the library imports from here."""
