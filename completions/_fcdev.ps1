
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'fcdev' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'fcdev'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'fcdev' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('login', 'login', [CompletionResultType]::ParameterValue, 'Log in to an fcdev server with a token (kept 0600 in the config dir)')
            [CompletionResult]::new('up', 'up', [CompletionResultType]::ParameterValue, 'Create your cluster (or resume/repair it) and wait until every VM is ready')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show your namespace, clusters, VMs and tunnel peers')
            [CompletionResult]::new('images', 'images', [CompletionResultType]::ParameterValue, 'List the prepared images of the server')
            [CompletionResult]::new('tunnel', 'tunnel', [CompletionResultType]::ParameterValue, 'Join your namespace''s network from this machine (userspace WireGuard)')
            [CompletionResult]::new('reset', 'reset', [CompletionResultType]::ParameterValue, 'Put a cluster back to its onboarding snapshot')
            [CompletionResult]::new('exec', 'exec', [CompletionResultType]::ParameterValue, 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code')
            [CompletionResult]::new('down', 'down', [CompletionResultType]::ParameterValue, 'Delete a cluster: VMs, disks, its snapshots and this machine''s tunnel peer')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host''s RAM freed)')
            [CompletionResult]::new('start', 'start', [CompletionResultType]::ParameterValue, 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)')
            [CompletionResult]::new('snapshot', 'snapshot', [CompletionResultType]::ParameterValue, 'Named snapshots of a cluster: save, restore, list, rm')
            [CompletionResult]::new('hosts', 'hosts', [CompletionResultType]::ParameterValue, 'Print /etc/hosts lines for your VMs')
            [CompletionResult]::new('ssh', 'ssh', [CompletionResultType]::ParameterValue, 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)')
            [CompletionResult]::new('ssh-config', 'ssh-config', [CompletionResultType]::ParameterValue, 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)')
            [CompletionResult]::new('logs', 'logs', [CompletionResultType]::ParameterValue, 'Show a VM''s console log (-f follows it)')
            [CompletionResult]::new('doctor', 'doctor', [CompletionResultType]::ParameterValue, 'Check this machine''s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh')
            [CompletionResult]::new('image', 'image', [CompletionResultType]::ParameterValue, 'Build or snapshot prepared images (host side)')
            [CompletionResult]::new('server', 'server', [CompletionResultType]::ParameterValue, 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print a shell completion script')
            [CompletionResult]::new('known-hosts', 'known-hosts', [CompletionResultType]::ParameterValue, 'Internal: ssh''s KnownHostsCommand (a VM''s host key as the server knows it)')
            [CompletionResult]::new('__socks-connect', '__socks-connect', [CompletionResultType]::ParameterValue, 'Internal: ssh''s ProxyCommand through the rootless tunnel''s SOCKS5 proxy')
            [CompletionResult]::new('__test-vm', '__test-vm', [CompletionResultType]::ParameterValue, 'Internal: the process behind one VM of the test backend')
            [CompletionResult]::new('guest-agent', 'guest-agent', [CompletionResultType]::ParameterValue, 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;login' {
            [CompletionResult]::new('--server', '--server', [CompletionResultType]::ParameterName, 'The fcdev server''s API URL, e.g. http://host:7070')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--token-stdin', '--token-stdin', [CompletionResultType]::ParameterName, 'Read the token from standard input instead of a hidden prompt')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;up' {
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'The image to build the cluster from (default: the profile''s image, `tiny`)')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster''s name (default: the profile''s cluster, `dev`)')
            [CompletionResult]::new('--local-port', '--local-port', [CompletionResultType]::ParameterName, 'With --local: the port of the local server''s API')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--local', '--local', [CompletionResultType]::ParameterName, 'Run everything on this machine: start (or reuse) a local `fcdev server --dev`, log in, build the default image if missing, then bring the cluster up')
            [CompletionResult]::new('--no-wait', '--no-wait', [CompletionResultType]::ParameterName, 'Return once the server accepted the request, without waiting for the VMs')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the cluster as JSON (no progress bars)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;status' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;images' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;tunnel' {
            [CompletionResult]::new('--mode', '--mode', [CompletionResultType]::ParameterName, 'tun (a TUN device; needs root or CAP_NET_ADMIN), proxy (rootless: SOCKS5 + forwards) or auto')
            [CompletionResult]::new('--socks', '--socks', [CompletionResultType]::ParameterName, 'Where the SOCKS5 proxy listens (proxy mode). It resolves `<vm>.<namespace>.fcdev` itself')
            [CompletionResult]::new('--http', '--http', [CompletionResultType]::ParameterName, 'Also run an HTTP proxy here (proxy mode; implies it under `--mode auto`): CONNECT and plain http:// requests, names resolved like the SOCKS5 proxy''s, e.g. `HTTPS_PROXY=http://127.0.0.1:8888`')
            [CompletionResult]::new('-L', '-L ', [CompletionResultType]::ParameterName, 'Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable')
            [CompletionResult]::new('--forward', '--forward', [CompletionResultType]::ParameterName, 'Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable')
            [CompletionResult]::new('--tun-name', '--tun-name', [CompletionResultType]::ParameterName, 'The TUN device''s name (TUN mode)')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'This machine''s peer name (default: the host name)')
            [CompletionResult]::new('--wg-config', '--wg-config', [CompletionResultType]::ParameterName, 'Write a wg-quick configuration for stock WireGuard clients to FILE (0600; stdout without FILE) instead of running the tunnel. It holds this machine''s private key (never sent to the server) and the same address as `fcdev tunnel`: use one or the other at a time. Calling it again gives the same key and address')
            [CompletionResult]::new('--idle-exit', '--idle-exit', [CompletionResultType]::ParameterName, 'Internal: end once no local connection has been open for SECS (proxy mode)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Status as JSON lines on stdout instead of a status line')
            [CompletionResult]::new('--stop', '--stop', [CompletionResultType]::ParameterName, 'Stop the background tunnel `fcdev ssh` started for this profile (it also ends by itself when idle)')
            [CompletionResult]::new('--background', '--background', [CompletionResultType]::ParameterName, 'Internal: this is the shared background tunnel of `fcdev ssh --stdio`')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;reset' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the cluster as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;exec' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;down' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--keep-peer', '--keep-peer', [CompletionResultType]::ParameterName, 'Keep this machine''s tunnel peer registered')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;stop' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the cluster as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;start' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the cluster as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;snapshot' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('save', 'save', [CompletionResultType]::ParameterValue, 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)')
            [CompletionResult]::new('restore', 'restore', [CompletionResultType]::ParameterValue, 'Bring the whole cluster back to a snapshot (what happened since is lost)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the cluster''s snapshots: name, when, size on disk, image')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a snapshot')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;snapshot;save' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;snapshot;restore' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-y', '-y', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the cluster as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;snapshot;list' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;snapshot;rm' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;snapshot;help' {
            [CompletionResult]::new('save', 'save', [CompletionResultType]::ParameterValue, 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)')
            [CompletionResult]::new('restore', 'restore', [CompletionResultType]::ParameterValue, 'Bring the whole cluster back to a snapshot (what happened since is lost)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the cluster''s snapshots: name, when, size on disk, image')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a snapshot')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;snapshot;help;save' {
            break
        }
        'fcdev;snapshot;help;restore' {
            break
        }
        'fcdev;snapshot;help;list' {
            break
        }
        'fcdev;snapshot;help;rm' {
            break
        }
        'fcdev;snapshot;help;help' {
            break
        }
        'fcdev;hosts' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;ssh' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster, or the one the host name names)')
            [CompletionResult]::new('-u', '-u', [CompletionResultType]::ParameterName, 'The user in the VM')
            [CompletionResult]::new('--user', '--user', [CompletionResultType]::ParameterName, 'The user in the VM')
            [CompletionResult]::new('--port', '--port', [CompletionResultType]::ParameterName, 'The VM''s port (with --stdio)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--stdio', '--stdio', [CompletionResultType]::ParameterName, 'Relay one connection to the VM''s ssh port on stdin/stdout (ssh''s ProxyCommand; what `fcdev ssh-config` writes). Uses the running tunnel, or starts a shared background one that ends when idle')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;ssh-config' {
            [CompletionResult]::new('--file', '--file', [CompletionResultType]::ParameterName, 'The ssh config file (default: ~/.ssh/config)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--remove', '--remove', [CompletionResultType]::ParameterName, 'Remove the block instead')
            [CompletionResult]::new('--dry-run', '--dry-run', [CompletionResultType]::ParameterName, 'Print the block instead of writing it')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;logs' {
            [CompletionResult]::new('-n', '-n', [CompletionResultType]::ParameterName, 'How many of the last lines to print first (at most 10000)')
            [CompletionResult]::new('--lines', '--lines', [CompletionResultType]::ParameterName, 'How many of the last lines to print first (at most 10000)')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The cluster (default: the profile''s cluster, `dev`)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-f', '-f', [CompletionResultType]::ParameterName, 'Keep printing what the console prints next (Ctrl-C to stop)')
            [CompletionResult]::new('--follow', '--follow', [CompletionResultType]::ParameterName, 'Keep printing what the console prints next (Ctrl-C to stop)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (`{"vm":"n1","line":"…"}`), as lines come')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;doctor' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the checks as JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;image' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('build', 'build', [CompletionResultType]::ParameterValue, 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)')
            [CompletionResult]::new('snapshot', 'snapshot', [CompletionResultType]::ParameterValue, 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;image;build' {
            [CompletionResult]::new('--out', '--out', [CompletionResultType]::ParameterName, 'Output folder (default: <data dir>/images/NAME)')
            [CompletionResult]::new('--kernel-version', '--kernel-version', [CompletionResultType]::ParameterName, 'Guest kernel version under /boot (default: the newest *-cloud-amd64)')
            [CompletionResult]::new('--hook', '--hook', [CompletionResultType]::ParameterName, 'press: a shell script run in the guest''s root filesystem after the recipe (operator''s extra steps)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--no-ssh', '--no-ssh', [CompletionResultType]::ParameterName, 'Leave dropbear (ssh) out')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Build even when the output holds an image of the same recipe')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON (progress stays on stderr)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;image;snapshot' {
            [CompletionResult]::new('--out', '--out', [CompletionResultType]::ParameterName, 'Image folder (default: <data dir>/images/NAME)')
            [CompletionResult]::new('--accel', '--accel', [CompletionResultType]::ParameterName, 'Accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the result as JSON (progress stays on stderr)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;image;help' {
            [CompletionResult]::new('build', 'build', [CompletionResultType]::ParameterValue, 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)')
            [CompletionResult]::new('snapshot', 'snapshot', [CompletionResultType]::ParameterValue, 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;image;help;build' {
            break
        }
        'fcdev;image;help;snapshot' {
            break
        }
        'fcdev;image;help;help' {
            break
        }
        'fcdev;server' {
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Where the API listens')
            [CompletionResult]::new('--hub-listen', '--hub-listen', [CompletionResultType]::ParameterName, 'Where the WireGuard hub listens (UDP). Port 0 picks a free one')
            [CompletionResult]::new('--hub-endpoint', '--hub-endpoint', [CompletionResultType]::ParameterName, 'The endpoint peers are told to send to (default: the hub''s listen address)')
            [CompletionResult]::new('--hub-tun', '--hub-tun', [CompletionResultType]::ParameterName, 'The hub''s TUN device towards the VM bridges, or `none` to run the hub without one')
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'State, images and VM folders (default: the user data dir, or FCDEV_DATA_DIR)')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'Keep the state in this PostgreSQL database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, or a unix socket: `postgres:///DB?host=/run/postgresql`) instead of the SQLite file DATA_DIR/state.db. The admin commands (`fcdev server user …`) take the same flag')
            [CompletionResult]::new('--images', '--images', [CompletionResultType]::ParameterName, 'The image catalog (default: DATA_DIR/images)')
            [CompletionResult]::new('--backend', '--backend', [CompletionResultType]::ParameterName, 'How VMs run: `qemu` (real VMs), or `process` (a test backend of local processes, for tests only)')
            [CompletionResult]::new('--accel', '--accel', [CompletionResultType]::ParameterName, 'QEMU accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg')
            [CompletionResult]::new('--max-starts', '--max-starts', [CompletionResultType]::ParameterName, 'How many VMs may be starting at once (restoring until configured, booting until ready); the others wait in a queue and `fcdev up` shows "queued (n ahead)". 0: four per core, at least 8')
            [CompletionResult]::new('--snapshot-quota', '--snapshot-quota', [CompletionResultType]::ParameterName, 'Disk that one engineer''s named snapshots may take (`fcdev snapshot save`), e.g. `20G`, `512M`; `0`: no limit. A save that would go over is refused with the snapshots to remove')
            [CompletionResult]::new('--idle-stop', '--idle-stop', [CompletionResultType]::ParameterName, 'Stop (`fcdev stop`) a ready cluster left alone this long: no state change and no tunnel handshake of its engineer, e.g. `8h`, `30m`; `0`: never (the default). `fcdev start` or `up` resumes it')
            [CompletionResult]::new('--netns', '--netns', [CompletionResultType]::ParameterName, 'Run VMs, bridges and the hub''s TUN inside this network namespace (created if missing); the API and hub sockets stay in the namespace the server was started in. `none` keeps everything where it is. Default: `fcdev-dev` with --dev, else none')
            [CompletionResult]::new('--user', '--user', [CompletionResultType]::ParameterName, 'With --dev: the first engineer''s name (default: your login name)')
            [CompletionResult]::new('--role', '--role', [CompletionResultType]::ParameterName, 'What this process does: `all` (API, VMs and hub in one process: the default), `control` (API, auth, allocation and the hosts'' leases; no VMs, no hub; use --database postgres://…), or `agent` (one per host: registers with --control and heartbeats; the token comes from FCDEV_HOST_TOKEN or --host-token-file)')
            [CompletionResult]::new('--control', '--control', [CompletionResultType]::ParameterName, 'With --role agent: the control plane''s URL (`http://control:7070`)')
            [CompletionResult]::new('--host-name', '--host-name', [CompletionResultType]::ParameterName, 'With --role agent: this host''s name, as added with `fcdev server host add NAME`')
            [CompletionResult]::new('--host-token-file', '--host-token-file', [CompletionResultType]::ParameterName, 'With --role agent: a file holding the host token (instead of FCDEV_HOST_TOKEN)')
            [CompletionResult]::new('--host-lease', '--host-lease', [CompletionResultType]::ParameterName, 'Seconds a host''s lease lasts: a host whose agent sent no heartbeat for that long is `lost` (agents send one every third of it)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--dev', '--dev', [CompletionResultType]::ParameterName, 'The embedded default for one machine: API and hub on loopback, VMs in their own network namespace (`fcdev-dev`), and a fresh login token printed for the first engineer')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('user', 'user', [CompletionResultType]::ParameterValue, 'Manage engineers and their tokens')
            [CompletionResult]::new('host', 'host', [CompletionResultType]::ParameterValue, 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;user' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add an engineer and print their token (shown once; the server keeps only its hash)')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a fresh extra token for an engineer')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List engineers')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;user;add' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;user;token' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;user;revoke' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;user;remove' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;user;list' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON: `[{"name": …}]`')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;user;help' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add an engineer and print their token (shown once; the server keeps only its hash)')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a fresh extra token for an engineer')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List engineers')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;user;help;add' {
            break
        }
        'fcdev;server;user;help;token' {
            break
        }
        'fcdev;server;user;help;revoke' {
            break
        }
        'fcdev;server;user;help;remove' {
            break
        }
        'fcdev;server;user;help;list' {
            break
        }
        'fcdev;server;user;help;help' {
            break
        }
        'fcdev;server;host' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke a host''s token: its agent is refused (401) from its next heartbeat')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;host;add' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON: `{"name": …, "token": …}`')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;host;list' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print JSON')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;host;revoke' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--database', '--database', [CompletionResultType]::ParameterName, 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;host;help' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke a host''s token: its agent is refused (401) from its next heartbeat')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;host;help;add' {
            break
        }
        'fcdev;server;host;help;list' {
            break
        }
        'fcdev;server;host;help;revoke' {
            break
        }
        'fcdev;server;host;help;help' {
            break
        }
        'fcdev;server;stop' {
            [CompletionResult]::new('--data-dir', '--data-dir', [CompletionResultType]::ParameterName, 'data-dir')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('--local', '--local', [CompletionResultType]::ParameterName, 'The server of this machine (the only kind `stop` knows)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;server;help' {
            [CompletionResult]::new('user', 'user', [CompletionResultType]::ParameterValue, 'Manage engineers and their tokens')
            [CompletionResult]::new('host', 'host', [CompletionResultType]::ParameterValue, 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;server;help;user' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add an engineer and print their token (shown once; the server keeps only its hash)')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a fresh extra token for an engineer')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List engineers')
            break
        }
        'fcdev;server;help;user;add' {
            break
        }
        'fcdev;server;help;user;token' {
            break
        }
        'fcdev;server;help;user;revoke' {
            break
        }
        'fcdev;server;help;user;remove' {
            break
        }
        'fcdev;server;help;user;list' {
            break
        }
        'fcdev;server;help;host' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke a host''s token: its agent is refused (401) from its next heartbeat')
            break
        }
        'fcdev;server;help;host;add' {
            break
        }
        'fcdev;server;help;host;list' {
            break
        }
        'fcdev;server;help;host;revoke' {
            break
        }
        'fcdev;server;help;stop' {
            break
        }
        'fcdev;server;help;help' {
            break
        }
        'fcdev;completions' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;known-hosts' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;__socks-connect' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;__test-vm' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'name')
            [CompletionResult]::new('--run-dir', '--run-dir', [CompletionResultType]::ParameterName, 'run-dir')
            [CompletionResult]::new('--cmdline', '--cmdline', [CompletionResultType]::ParameterName, 'cmdline')
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;guest-agent' {
            [CompletionResult]::new('--profile', '--profile', [CompletionResultType]::ParameterName, 'The profile (server + token) to use')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More log output (repeat for more)')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'fcdev;help' {
            [CompletionResult]::new('login', 'login', [CompletionResultType]::ParameterValue, 'Log in to an fcdev server with a token (kept 0600 in the config dir)')
            [CompletionResult]::new('up', 'up', [CompletionResultType]::ParameterValue, 'Create your cluster (or resume/repair it) and wait until every VM is ready')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show your namespace, clusters, VMs and tunnel peers')
            [CompletionResult]::new('images', 'images', [CompletionResultType]::ParameterValue, 'List the prepared images of the server')
            [CompletionResult]::new('tunnel', 'tunnel', [CompletionResultType]::ParameterValue, 'Join your namespace''s network from this machine (userspace WireGuard)')
            [CompletionResult]::new('reset', 'reset', [CompletionResultType]::ParameterValue, 'Put a cluster back to its onboarding snapshot')
            [CompletionResult]::new('exec', 'exec', [CompletionResultType]::ParameterValue, 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code')
            [CompletionResult]::new('down', 'down', [CompletionResultType]::ParameterValue, 'Delete a cluster: VMs, disks, its snapshots and this machine''s tunnel peer')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host''s RAM freed)')
            [CompletionResult]::new('start', 'start', [CompletionResultType]::ParameterValue, 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)')
            [CompletionResult]::new('snapshot', 'snapshot', [CompletionResultType]::ParameterValue, 'Named snapshots of a cluster: save, restore, list, rm')
            [CompletionResult]::new('hosts', 'hosts', [CompletionResultType]::ParameterValue, 'Print /etc/hosts lines for your VMs')
            [CompletionResult]::new('ssh', 'ssh', [CompletionResultType]::ParameterValue, 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)')
            [CompletionResult]::new('ssh-config', 'ssh-config', [CompletionResultType]::ParameterValue, 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)')
            [CompletionResult]::new('logs', 'logs', [CompletionResultType]::ParameterValue, 'Show a VM''s console log (-f follows it)')
            [CompletionResult]::new('doctor', 'doctor', [CompletionResultType]::ParameterValue, 'Check this machine''s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh')
            [CompletionResult]::new('image', 'image', [CompletionResultType]::ParameterValue, 'Build or snapshot prepared images (host side)')
            [CompletionResult]::new('server', 'server', [CompletionResultType]::ParameterValue, 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Print a shell completion script')
            [CompletionResult]::new('known-hosts', 'known-hosts', [CompletionResultType]::ParameterValue, 'Internal: ssh''s KnownHostsCommand (a VM''s host key as the server knows it)')
            [CompletionResult]::new('__socks-connect', '__socks-connect', [CompletionResultType]::ParameterValue, 'Internal: ssh''s ProxyCommand through the rootless tunnel''s SOCKS5 proxy')
            [CompletionResult]::new('__test-vm', '__test-vm', [CompletionResultType]::ParameterValue, 'Internal: the process behind one VM of the test backend')
            [CompletionResult]::new('guest-agent', 'guest-agent', [CompletionResultType]::ParameterValue, 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'fcdev;help;login' {
            break
        }
        'fcdev;help;up' {
            break
        }
        'fcdev;help;status' {
            break
        }
        'fcdev;help;images' {
            break
        }
        'fcdev;help;tunnel' {
            break
        }
        'fcdev;help;reset' {
            break
        }
        'fcdev;help;exec' {
            break
        }
        'fcdev;help;down' {
            break
        }
        'fcdev;help;stop' {
            break
        }
        'fcdev;help;start' {
            break
        }
        'fcdev;help;snapshot' {
            [CompletionResult]::new('save', 'save', [CompletionResultType]::ParameterValue, 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)')
            [CompletionResult]::new('restore', 'restore', [CompletionResultType]::ParameterValue, 'Bring the whole cluster back to a snapshot (what happened since is lost)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the cluster''s snapshots: name, when, size on disk, image')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a snapshot')
            break
        }
        'fcdev;help;snapshot;save' {
            break
        }
        'fcdev;help;snapshot;restore' {
            break
        }
        'fcdev;help;snapshot;list' {
            break
        }
        'fcdev;help;snapshot;rm' {
            break
        }
        'fcdev;help;hosts' {
            break
        }
        'fcdev;help;ssh' {
            break
        }
        'fcdev;help;ssh-config' {
            break
        }
        'fcdev;help;logs' {
            break
        }
        'fcdev;help;doctor' {
            break
        }
        'fcdev;help;image' {
            [CompletionResult]::new('build', 'build', [CompletionResultType]::ParameterValue, 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)')
            [CompletionResult]::new('snapshot', 'snapshot', [CompletionResultType]::ParameterValue, 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`')
            break
        }
        'fcdev;help;image;build' {
            break
        }
        'fcdev;help;image;snapshot' {
            break
        }
        'fcdev;help;server' {
            [CompletionResult]::new('user', 'user', [CompletionResultType]::ParameterValue, 'Manage engineers and their tokens')
            [CompletionResult]::new('host', 'host', [CompletionResultType]::ParameterValue, 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane')
            [CompletionResult]::new('stop', 'stop', [CompletionResultType]::ParameterValue, 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start')
            break
        }
        'fcdev;help;server;user' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add an engineer and print their token (shown once; the server keeps only its hash)')
            [CompletionResult]::new('token', 'token', [CompletionResultType]::ParameterValue, 'Print a fresh extra token for an engineer')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List engineers')
            break
        }
        'fcdev;help;server;user;add' {
            break
        }
        'fcdev;help;server;user;token' {
            break
        }
        'fcdev;help;server;user;revoke' {
            break
        }
        'fcdev;help;server;user;remove' {
            break
        }
        'fcdev;help;server;user;list' {
            break
        }
        'fcdev;help;server;host' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Revoke a host''s token: its agent is refused (401) from its next heartbeat')
            break
        }
        'fcdev;help;server;host;add' {
            break
        }
        'fcdev;help;server;host;list' {
            break
        }
        'fcdev;help;server;host;revoke' {
            break
        }
        'fcdev;help;server;stop' {
            break
        }
        'fcdev;help;completions' {
            break
        }
        'fcdev;help;known-hosts' {
            break
        }
        'fcdev;help;__socks-connect' {
            break
        }
        'fcdev;help;__test-vm' {
            break
        }
        'fcdev;help;guest-agent' {
            break
        }
        'fcdev;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
