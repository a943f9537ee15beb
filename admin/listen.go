package admin

import (
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"stsmap/socketmap"
)

// DefaultSocketMode lets only the daemon's user and root use the admin
// socket: a purge drops the policies that protect mail from downgrades until
// they are fetched again.
const DefaultSocketMode fs.FileMode = 0o600

// Listen creates the admin socket at path with mode, and path's directory
// (mode 0700) when it is missing. A socket left behind by a daemon that is
// gone is replaced; one that something answers on is not.
func Listen(path string, mode fs.FileMode) (net.Listener, error) {
	// The kernel's limit, less the terminating NUL; bind(2) would say only
	// "invalid argument".
	if limit := len(syscall.RawSockaddrUnix{}.Path) - 1; len(path) > limit {
		return nil, fmt.Errorf("admin: socket path %s is %d bytes long; a unix socket's path may have %d at most", path, len(path), limit)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := socketmap.RemoveStaleSocket(path); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error { return restrictBeforeBind(c, mode) }}
	l, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	// Exactly mode, whatever the umask took away.
	if err := os.Chmod(path, mode.Perm()); err != nil {
		l.Close()
		return nil, fmt.Errorf("admin: %w", err)
	}
	return l, nil
}
