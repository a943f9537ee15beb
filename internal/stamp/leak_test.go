package stamp

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them
// (issue 8: nothing leaks).
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
