//! Command-line subcommands (one file each); each only parses and calls the library.
