# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_fcdev_global_optspecs
    string join \n profile= v/verbose h/help V/version
end

function __fish_fcdev_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_fcdev_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_fcdev_using_subcommand
    set -l cmd (__fish_fcdev_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c fcdev -n "__fish_fcdev_needs_command" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_needs_command" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_needs_command" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_needs_command" -s V -l version -d 'Print version'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "login" -d 'Log in to an fcdev server with a token (kept 0600 in the config dir)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "up" -d 'Create your cluster (or resume/repair it) and wait until every VM is ready'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "status" -d 'Show your namespace, clusters, VMs and tunnel peers'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "images" -d 'List the prepared images of the server'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "tunnel" -d 'Join your namespace\'s network from this machine (userspace WireGuard)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "reset" -d 'Put a cluster back to its onboarding snapshot'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "exec" -d 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "down" -d 'Delete a cluster: VMs, disks, its snapshots and this machine\'s tunnel peer'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "stop" -d 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host\'s RAM freed)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "start" -d 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "snapshot" -d 'Named snapshots of a cluster: save, restore, list, rm'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "hosts" -d 'Print /etc/hosts lines for your VMs'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "ssh" -d 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "ssh-config" -d 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "logs" -d 'Show a VM\'s console log (-f follows it)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "doctor" -d 'Check this machine\'s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "image" -d 'Build or snapshot prepared images (host side)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "server" -d 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "known-hosts" -d 'Internal: ssh\'s KnownHostsCommand (a VM\'s host key as the server knows it)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "__socks-connect" -d 'Internal: ssh\'s ProxyCommand through the rootless tunnel\'s SOCKS5 proxy'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "__test-vm" -d 'Internal: the process behind one VM of the test backend'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "guest-agent" -d 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)'
complete -c fcdev -n "__fish_fcdev_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -l server -d 'The fcdev server\'s API URL, e.g. http://host:7070' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -l token-stdin -d 'Read the token from standard input instead of a hidden prompt'
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -l json -d 'Print the result as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand login" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l image -d 'The image to build the cluster from (default: the profile\'s image, `tiny`)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l name -d 'The cluster\'s name (default: the profile\'s cluster, `dev`)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l local-port -d 'With --local: the port of the local server\'s API' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l local -d 'Run everything on this machine: start (or reuse) a local `fcdev server --dev`, log in, build the default image if missing, then bring the cluster up'
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l no-wait -d 'Return once the server accepted the request, without waiting for the VMs'
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -l json -d 'Print the cluster as JSON (no progress bars)'
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand up" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand status" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand status" -l json -d 'Print JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand status" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand status" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand images" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand images" -l json -d 'Print JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand images" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand images" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l mode -d 'tun (a TUN device; needs root or CAP_NET_ADMIN), proxy (rootless: SOCKS5 + forwards) or auto' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l socks -d 'Where the SOCKS5 proxy listens (proxy mode). It resolves `<vm>.<namespace>.fcdev` itself' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l http -d 'Also run an HTTP proxy here (proxy mode; implies it under `--mode auto`): CONNECT and plain http:// requests, names resolved like the SOCKS5 proxy\'s, e.g. `HTTPS_PROXY=http://127.0.0.1:8888`' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -s L -l forward -d 'Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l tun-name -d 'The TUN device\'s name (TUN mode)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l name -d 'This machine\'s peer name (default: the host name)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l wg-config -d 'Write a wg-quick configuration for stock WireGuard clients to FILE (0600; stdout without FILE) instead of running the tunnel. It holds this machine\'s private key (never sent to the server) and the same address as `fcdev tunnel`: use one or the other at a time. Calling it again gives the same key and address' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l idle-exit -d 'Internal: end once no local connection has been open for SECS (proxy mode)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l json -d 'Status as JSON lines on stdout instead of a status line'
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l stop -d 'Stop the background tunnel `fcdev ssh` started for this profile (it also ends by itself when idle)'
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -l background -d 'Internal: this is the shared background tunnel of `fcdev ssh --stdio`'
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand tunnel" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -s y -l yes -d 'Do not ask for confirmation'
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -l json -d 'Print the cluster as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand reset" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand exec" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand exec" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand exec" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand exec" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -l keep-peer -d 'Keep this machine\'s tunnel peer registered'
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -s y -l yes -d 'Do not ask for confirmation'
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -l json -d 'Print the result as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand down" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand stop" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand stop" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand stop" -l json -d 'Print the cluster as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand stop" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand stop" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand start" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand start" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand start" -l json -d 'Print the cluster as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand start" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand start" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -f -a "save" -d 'Save the whole cluster as it is now: every VM\'s memory, processes and disk (taken together)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -f -a "restore" -d 'Bring the whole cluster back to a snapshot (what happened since is lost)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -f -a "list" -d 'List the cluster\'s snapshots: name, when, size on disk, image'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -f -a "rm" -d 'Remove a snapshot'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and not __fish_seen_subcommand_from save restore list rm help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from save" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from save" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from save" -l json -d 'Print the result as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from save" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from save" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -s y -l yes -d 'Do not ask for confirmation'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -l json -d 'Print the cluster as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from restore" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from list" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from list" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from list" -l json -d 'Print JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from rm" -l name -d 'The cluster (default: the profile\'s cluster)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from rm" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from rm" -l json -d 'Print the result as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from rm" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from help" -f -a "save" -d 'Save the whole cluster as it is now: every VM\'s memory, processes and disk (taken together)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from help" -f -a "restore" -d 'Bring the whole cluster back to a snapshot (what happened since is lost)'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the cluster\'s snapshots: name, when, size on disk, image'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Remove a snapshot'
complete -c fcdev -n "__fish_fcdev_using_subcommand snapshot; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand hosts" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand hosts" -l json -d 'Print JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand hosts" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand hosts" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -l name -d 'The cluster (default: the profile\'s cluster, or the one the host name names)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -s u -l user -d 'The user in the VM' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -l port -d 'The VM\'s port (with --stdio)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -l stdio -d 'Relay one connection to the VM\'s ssh port on stdin/stdout (ssh\'s ProxyCommand; what `fcdev ssh-config` writes). Uses the running tunnel, or starts a shared background one that ends when idle'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -l file -d 'The ssh config file (default: ~/.ssh/config)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -l remove -d 'Remove the block instead'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -l dry-run -d 'Print the block instead of writing it'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -l json -d 'Print the result as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand ssh-config" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -s n -l lines -d 'How many of the last lines to print first (at most 10000)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -l name -d 'The cluster (default: the profile\'s cluster, `dev`)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -s f -l follow -d 'Keep printing what the console prints next (Ctrl-C to stop)'
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -l json -d 'One JSON object per line (`{"vm":"n1","line":"…"}`), as lines come'
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand logs" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand doctor" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand doctor" -l json -d 'Print the checks as JSON'
complete -c fcdev -n "__fish_fcdev_using_subcommand doctor" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -f -a "build" -d 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -f -a "snapshot" -d 'Boot the image\'s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and not __fish_seen_subcommand_from build snapshot help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l out -d 'Output folder (default: <data dir>/images/NAME)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l kernel-version -d 'Guest kernel version under /boot (default: the newest *-cloud-amd64)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l hook -d 'press: a shell script run in the guest\'s root filesystem after the recipe (operator\'s extra steps)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l no-ssh -d 'Leave dropbear (ssh) out'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l force -d 'Build even when the output holds an image of the same recipe'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -l json -d 'Print the result as JSON (progress stays on stderr)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from build" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -l out -d 'Image folder (default: <data dir>/images/NAME)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -l accel -d 'Accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -l json -d 'Print the result as JSON (progress stays on stderr)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from snapshot" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "build" -d 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "snapshot" -d 'Boot the image\'s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
complete -c fcdev -n "__fish_fcdev_using_subcommand image; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l listen -d 'Where the API listens' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l hub-listen -d 'Where the WireGuard hub listens (UDP). Port 0 picks a free one' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l hub-endpoint -d 'The endpoint peers are told to send to (default: the hub\'s listen address)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l hub-tun -d 'The hub\'s TUN device towards the VM bridges, or `none` to run the hub without one' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l data-dir -d 'State, images and VM folders (default: the user data dir, or FCDEV_DATA_DIR)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l database -d 'Keep the state in this PostgreSQL database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, or a unix socket: `postgres:///DB?host=/run/postgresql`) instead of the SQLite file DATA_DIR/state.db. The admin commands (`fcdev server user …`) take the same flag' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l images -d 'The image catalog (default: DATA_DIR/images)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l backend -d 'How VMs run: `qemu` (real VMs), or `process` (a test backend of local processes, for tests only)' -r -f -a "qemu\t'Real VMs with qemu-system-x86_64'
process\t'Test backend: local processes serving HTTP on loopback. For tests only'"
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l accel -d 'QEMU accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l max-starts -d 'How many VMs may be starting at once (restoring until configured, booting until ready); the others wait in a queue and `fcdev up` shows "queued (n ahead)". 0: four per core, at least 8' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l snapshot-quota -d 'Disk that one engineer\'s named snapshots may take (`fcdev snapshot save`), e.g. `20G`, `512M`; `0`: no limit. A save that would go over is refused with the snapshots to remove' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l idle-stop -d 'Stop (`fcdev stop`) a ready cluster left alone this long: no state change and no tunnel handshake of its engineer, e.g. `8h`, `30m`; `0`: never (the default). `fcdev start` or `up` resumes it' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l netns -d 'Run VMs, bridges and the hub\'s TUN inside this network namespace (created if missing); the API and hub sockets stay in the namespace the server was started in. `none` keeps everything where it is. Default: `fcdev-dev` with --dev, else none' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l user -d 'With --dev: the first engineer\'s name (default: your login name)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l role -d 'What this process does: `all` (API, VMs and hub in one process: the default), `control` (API, auth, allocation and the hosts\' leases; no VMs, no hub; use --database postgres://…), or `agent` (one per host: registers with --control and heartbeats; the token comes from FCDEV_HOST_TOKEN or --host-token-file)' -r -f -a "all\t'API, VMs and hub in one process (one host)'
control\t'API, auth, allocation and the hosts\' leases; no VMs, no hub'
agent\t'One per host: registers with the control plane and heartbeats'"
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l control -d 'With --role agent: the control plane\'s URL (`http://control:7070`)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l host-name -d 'With --role agent: this host\'s name, as added with `fcdev server host add NAME`' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l host-token-file -d 'With --role agent: a file holding the host token (instead of FCDEV_HOST_TOKEN)' -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l host-lease -d 'Seconds a host\'s lease lasts: a host whose agent sent no heartbeat for that long is `lost` (agents send one every third of it)' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -l dev -d 'The embedded default for one machine: API and hub on loopback, VMs in their own network namespace (`fcdev-dev`), and a fresh login token printed for the first engineer'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -f -a "user" -d 'Manage engineers and their tokens'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -f -a "host" -d 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -f -a "stop" -d 'Stop the server running on this machine\'s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and not __fish_seen_subcommand_from user host stop help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "add" -d 'Add an engineer and print their token (shown once; the server keeps only its hash)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "token" -d 'Print a fresh extra token for an engineer'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "revoke" -d 'Revoke every token of an engineer and drop their WireGuard peers (a running server\'s hub drops them within a second)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "remove" -d 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "list" -d 'List engineers'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from user" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -f -a "add" -d 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -f -a "list" -d 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -f -a "revoke" -d 'Revoke a host\'s token: its agent is refused (401) from its next heartbeat'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from host" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from stop" -l data-dir -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from stop" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from stop" -l local -d 'The server of this machine (the only kind `stop` knows)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from stop" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from stop" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from help" -f -a "user" -d 'Manage engineers and their tokens'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from help" -f -a "host" -d 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from help" -f -a "stop" -d 'Stop the server running on this machine\'s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
complete -c fcdev -n "__fish_fcdev_using_subcommand server; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand completions" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand completions" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand completions" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand known-hosts" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand known-hosts" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand known-hosts" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand __socks-connect" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand __socks-connect" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand __socks-connect" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -l name -r
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -l run-dir -r -F
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -l cmdline -r
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand __test-vm" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand guest-agent" -l profile -d 'The profile (server + token) to use' -r
complete -c fcdev -n "__fish_fcdev_using_subcommand guest-agent" -s v -l verbose -d 'More log output (repeat for more)'
complete -c fcdev -n "__fish_fcdev_using_subcommand guest-agent" -s h -l help -d 'Print help'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "login" -d 'Log in to an fcdev server with a token (kept 0600 in the config dir)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "up" -d 'Create your cluster (or resume/repair it) and wait until every VM is ready'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "status" -d 'Show your namespace, clusters, VMs and tunnel peers'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "images" -d 'List the prepared images of the server'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "tunnel" -d 'Join your namespace\'s network from this machine (userspace WireGuard)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "reset" -d 'Put a cluster back to its onboarding snapshot'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "exec" -d 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "down" -d 'Delete a cluster: VMs, disks, its snapshots and this machine\'s tunnel peer'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "stop" -d 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host\'s RAM freed)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "start" -d 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "snapshot" -d 'Named snapshots of a cluster: save, restore, list, rm'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "hosts" -d 'Print /etc/hosts lines for your VMs'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "ssh" -d 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "ssh-config" -d 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "logs" -d 'Show a VM\'s console log (-f follows it)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "doctor" -d 'Check this machine\'s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "image" -d 'Build or snapshot prepared images (host side)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "server" -d 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "completions" -d 'Print a shell completion script'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "known-hosts" -d 'Internal: ssh\'s KnownHostsCommand (a VM\'s host key as the server knows it)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "__socks-connect" -d 'Internal: ssh\'s ProxyCommand through the rootless tunnel\'s SOCKS5 proxy'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "__test-vm" -d 'Internal: the process behind one VM of the test backend'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "guest-agent" -d 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and not __fish_seen_subcommand_from login up status images tunnel reset exec down stop start snapshot hosts ssh ssh-config logs doctor image server completions known-hosts __socks-connect __test-vm guest-agent help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from snapshot" -f -a "save" -d 'Save the whole cluster as it is now: every VM\'s memory, processes and disk (taken together)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from snapshot" -f -a "restore" -d 'Bring the whole cluster back to a snapshot (what happened since is lost)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from snapshot" -f -a "list" -d 'List the cluster\'s snapshots: name, when, size on disk, image'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from snapshot" -f -a "rm" -d 'Remove a snapshot'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "build" -d 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from image" -f -a "snapshot" -d 'Boot the image\'s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from server" -f -a "user" -d 'Manage engineers and their tokens'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from server" -f -a "host" -d 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
complete -c fcdev -n "__fish_fcdev_using_subcommand help; and __fish_seen_subcommand_from server" -f -a "stop" -d 'Stop the server running on this machine\'s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
