from .cli import main

if __name__ == "__main__":  # spawned workers re-import this module; they must not rerun the CLI
    main()
