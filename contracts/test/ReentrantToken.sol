// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title ReentrantToken: a TEST-ONLY malicious ERC-20.
/// @notice Once armed, the next transfer out of `target` calls `target` again with `payload`
/// (e.g. settle or refund of the escrow paying out) before returning. The outcome of that
/// nested call is kept (`reentryOk`, `reentryResult`) and the outer transfer goes on, so a test
/// sees both that the re-entry was refused and that the outer call paid exactly what it should.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;
    uint256 public reentries;
    bool public reentryOk;
    bytes public reentryResult;

    constructor() ERC20("Reentrant Token", "REENTER") {}

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        address t = target;
        if (t != address(0) && from == t) {
            target = address(0); // once
            reentries += 1;
            (reentryOk, reentryResult) = t.call(payload);
        }
    }
}
