// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title TestUSD: the stablecoin of devnets and testnets (6 decimals, like USDC).
/// @notice Anyone may mint (it is a faucet), at most MINT_CAP per call. Worthless by design.
contract TestUSD is ERC20 {
    /// @notice The most one `mint` call creates: one million tUSD.
    uint256 public constant MINT_CAP = 1_000_000 * 10 ** 6;

    error MintCapExceeded(uint256 amount, uint256 cap);

    /// @notice Emitted beside ERC-20's Transfer(0, to, amount) so a dashboard can tell faucet use apart.
    event Minted(address indexed by, address indexed to, uint256 amount);

    constructor() ERC20("gridmesh Test USD", "tUSD") {}

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    function mint(address to, uint256 amount) external {
        if (amount > MINT_CAP) revert MintCapExceeded(amount, MINT_CAP);
        _mint(to, amount);
        emit Minted(msg.sender, to, amount);
    }
}
