"""`python -m compot_deploy.cli`: the same command line as `compot-deploy`."""

from . import main

main()
