"""VM statuses and exit reasons, with VDSM's names and codes (the engine's vocabulary)."""

WAIT_FOR_LAUNCH = "WaitForLaunch"
POWERING_UP = "Powering up"
UP = "Up"
PAUSED = "Paused"
POWERING_DOWN = "Powering down"
REBOOT_IN_PROGRESS = "Reboot In Progress"
MIGRATION_SOURCE = "Migration Source"
MIGRATION_DESTINATION = "Migration Destination"
SAVING_STATE = "Saving State"
RESTORING_STATE = "Restoring state"
DOWN = "Down"

#: Statuses in which a QEMU process exists.
RUNNING = frozenset({POWERING_UP, UP, PAUSED, POWERING_DOWN, REBOOT_IN_PROGRESS,
                     MIGRATION_SOURCE, MIGRATION_DESTINATION, SAVING_STATE, RESTORING_STATE})


class ExitReason:
    """VDSM's exitReason codes and their messages."""

    SUCCESS = 0
    GENERIC_ERROR = 1
    LOST_QEMU_CONNECTION = 2
    START_FAILED = 3
    MIGRATION_SUCCEEDED = 4
    SAVE_STATE_SUCCEEDED = 5
    ADMIN_SHUTDOWN = 6
    USER_SHUTDOWN = 7
    MIGRATION_FAILED = 8
    DOMAIN_MISSING = 9
    DESTROYED_ON_STARTUP = 10
    HOST_SHUTDOWN = 11

    MESSAGES = {
        SUCCESS: "VM terminated succesfully",
        GENERIC_ERROR: "VM terminated with error",
        LOST_QEMU_CONNECTION: "Lost connection with qemu process",
        START_FAILED: "failed to start the VM",
        MIGRATION_SUCCEEDED: "Migration succeeded",
        SAVE_STATE_SUCCEEDED: "SaveState succeeded",
        ADMIN_SHUTDOWN: "Admin shut down from the engine",
        USER_SHUTDOWN: "User shut down from within the guest",
        MIGRATION_FAILED: "VM failed to migrate",
        DOMAIN_MISSING: "Failed to find the VM's process",
        DESTROYED_ON_STARTUP: "VM destroyed during the startup",
        HOST_SHUTDOWN: "VM has been terminated on the host",
    }
