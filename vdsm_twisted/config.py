"""
The agent's configuration keys: the embedded defaults and their documentation.

C{etc/vdsm.conf} is rendered from this list (C{vdsm-twisted-tool sample-config
vdsm}) and a test keeps the two in step.
"""

from vdsm_twisted.common.config import Key, schema

SCHEMA = schema([
    # -- where the engine API listens
    Key("addresses", "management_ip", "str", "0.0.0.0",
        "Address the engine API listens on (TLS). \"::\" listens on IPv6 and IPv4."),
    Key("addresses", "management_port", "port", "54321",
        "TCP port of the engine API (VDSM's port). 0 picks a free port (tests)."),
    Key("addresses", "request_queues", "list",
        "jms.topic.vdsm_requests,jms.topic.vdsm_irs_requests",
        "STOMP destinations answered by the agent's JSON-RPC server\n"
        "(and their \"<queue>.<suffix>\" sub-destinations)."),
    Key("addresses", "response_queue", "str", "jms.topic.vdsm_responses",
        "Where responses to requests that carry no reply-to header are sent."),
    Key("addresses", "event_queue", "str", "jms.queue.events",
        "STOMP destination of event notifications (|virt|VM_status|<id>, ...)."),
    Key("addresses", "backlog", "positive-int", "128",
        "listen(2) backlog of the engine API socket."),

    # -- TLS
    Key("tls", "pki_dir", "path", "/etc/pki/vdsm",
        "PKI directory in VDSM's layout: certs/cacert.pem, certs/vdsmcert.pem,\n"
        "keys/vdsmkey.pem. vdsm-twisted-tool pki --dir DIR creates a dev one."),
    Key("tls", "ca_cert", "path", "certs/cacert.pem",
        "CA certificate(s) that client certificates must chain to (relative to pki_dir)."),
    Key("tls", "cert", "path", "certs/vdsmcert.pem",
        "This host's certificate (relative to pki_dir)."),
    Key("tls", "key", "path", "keys/vdsmkey.pem",
        "This host's private key (relative to pki_dir)."),
    Key("tls", "handshake_timeout", "positive-float", "10",
        "Seconds a client has to complete the TLS handshake and send its first bytes."),

    # -- limits protecting the daemon from its clients
    Key("limits", "max_message_size", "positive-int", "4194304",
        "Largest STOMP frame / JSON-RPC message / AMP request accepted, in bytes.\n"
        "A client that sends more is disconnected (that connection only)."),
    Key("limits", "max_connections", "positive-int", "256",
        "Concurrent engine API connections; more are closed at accept."),
    Key("limits", "max_pending_requests", "positive-int", "64",
        "Requests one connection may have in flight; more get a JSON-RPC error."),
    Key("limits", "max_batch_size", "positive-int", "100",
        "Largest JSON-RPC batch (array of requests) accepted."),

    # -- privileged helper
    Key("privd", "socket", "path", "/run/vdsm-twisted-privd/privd.sock",
        "UNIX socket of privd, the root helper."),
    Key("privd", "call_timeout", "positive-float", "30",
        "Seconds before a privd call fails with a timeout."),
    Key("privd", "reconnect_max_delay", "positive-float", "5",
        "Upper bound, in seconds, of the backoff between reconnects to privd."),

    # -- the agent itself
    Key("agent", "run_dir", "path", "/run/vdsm-twisted",
        "Runtime directory (tmpfs): driver state, QMP sockets, pid files."),
    Key("agent", "log_level", "log-level", "info",
        "Lowest level logged: debug, info, warn, error, critical."),
    Key("agent", "host_uuid_file", "path", "/etc/vdsm/vdsm.id",
        "File holding this host's uuid, if any; otherwise the DMI product uuid,\n"
        "then /etc/machine-id, is used."),

    Key("agent", "standby", "bool", "true",
        "Keep a warm standby agent (imported, waiting, holding the listening socket)\n"
        "that takes over within milliseconds if this one dies, instead of a cold\n"
        "restart. Costs one idle process (~45 MiB). With systemd, the unit's\n"
        "PIDFile=<run_dir>/agent.pid lets the standby become the main process."),
    Key("agent", "upgrade_drain_timeout", "positive-float", "10",
        "Upgrade: seconds in-flight API calls get to finish before the exec."),
    Key("agent", "upgrade_confirm_timeout", "positive-float", "60",
        "Upgrade: seconds the new build gets to serve again and re-adopt every VM;\n"
        "past that (or if it exits) the same process falls back to the previous build."),

    # -- hooks
    Key("hooks", "dir", "path", "/usr/libexec/vdsm-twisted/hooks",
        "Directory of hook points: <dir>/<hook_name>/ holds executables run in byte order\n"
        "(VDSM's hook names: before_vm_start, after_vm_destroy, ...). Missing = no hooks.\n"
        "Scripts and dirs must be owned by root or the agent's user and not\n"
        "group/world-writable, or they are skipped."),
    Key("hooks", "timeout", "positive-float", "30",
        "Seconds each hook script may run. Past it its process group is killed; a\n"
        "before_* hook then stops the operation, an after_* hook is only logged."),

    # -- sampling
    Key("sampling", "host_stats_interval", "positive-float", "2",
        "Seconds between host statistics samples (CPU, memory, NIC rates)."),
    Key("sampling", "vm_stats_interval", "positive-float", "2",
        "Seconds between VM statistics samples (all VMs at once, into a cache\n"
        "that VM.getStats and Host.getAllVmStats read)."),

    # -- VMs (the qemu driver)
    Key("vm", "image_roots", "list", "/var/lib/vdsm-twisted/images,/rhev/data-center",
        "Directories disk and CD-ROM images must resolve into (after realpath).\n"
        "A path outside them is refused."),
    Key("vm", "log_dir", "path", "/var/log/vdsm-twisted/qemu",
        "Where each VM's QEMU output (<uuid>.log) and serial console\n"
        "(<uuid>.serial.log) are written."),
    Key("vm", "qemu_binary", "str", "qemu-system-x86_64",
        "The QEMU system emulator (a name looked up in PATH, or a path)."),
    Key("vm", "accel", "str", "auto",
        "auto (KVM when /dev/kvm opens read-write, else TCG), kvm or tcg.",
        choices=("auto", "kvm", "tcg")),
    Key("vm", "tap_prefix", "str", "vnet",
        "Prefix of the tap devices the agent asks privd to create\n"
        "(must be allowed by privd's [network] tap_prefix)."),
    Key("vm", "max_xml_size", "positive-int", "1048576",
        "Largest domain XML accepted by VM.create, in bytes."),
    Key("vm", "destroy_grace_timeout", "positive-float", "5",
        "VM.destroy: seconds QEMU gets to quit through QMP before SIGTERM."),
    Key("vm", "sigterm_timeout", "positive-float", "5",
        "VM.destroy: seconds between SIGTERM and SIGKILL."),
    Key("vm", "shutdown_timeout", "positive-float", "120",
        "VM.shutdown: default seconds the guest gets to power off after the ACPI\n"
        "power button before the VM is destroyed (the call's timeout overrides)."),
    Key("vm", "qmp_timeout", "positive-float", "5",
        "Seconds a QMP command may take; a monitor that misses it is reported\n"
        "with monitorResponse -1."),
    Key("vm", "vnc_display_base", "int", "0",
        "Autoport VNC consoles take the first free display from this one on\n"
        "(port 5900 + display), up to 99 above it."),
    Key("vm", "qmp_connect_timeout", "positive-float", "10",
        "Seconds QEMU gets to open its QMP socket after it is started."),
])


def load(path):
    """Read the agent configuration from C{path}, or the embedded defaults."""
    return SCHEMA.load(path)
