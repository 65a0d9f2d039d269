"""``python -m marsctl.data ...`` runs the ``marsctl data`` commands on their own."""

from marsctl.cli.data import data_app

if __name__ == "__main__":
    data_app(prog_name="marsctl data")
